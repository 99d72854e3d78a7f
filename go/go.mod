module github.com/ally-rs/ally/go

go 1.19

require github.com/godbus/dbus/v5 v5.1.0

require google.golang.org/grpc v1.33.3
