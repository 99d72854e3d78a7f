// Command grpc is the Go gRPC example: a grpc.Server with the standard health
// service and a hand-written hello.Greeter (no protoc needed), drained by
// allygrpc.Serve so that a reload loses no call.
//
//	grpc [--listen ADDR] [--version V]
//
// hello.Greeter/Hello answers HelloReply{message: "hello NAME version=V", pid,
// generation}, the messages of client/tests/greeter (the Rust tonic_server's). The
// health service says SERVING once ready and NOT_SERVING from the stop on. Build and
// run it under a broker:
//
//	go/offline.sh build -o target/go/hello-grpc ./examples/grpc
//	target/debug/ally run hello-grpc -- target/go/hello-grpc --listen 127.0.0.1:50051
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"

	ally "github.com/ally-rs/ally/go"
	"github.com/ally-rs/ally/go/allygrpc"
	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func main() {
	listen := flag.String("listen", "127.0.0.1:50051", "the address to serve on")
	version := flag.String("version", os.Getenv("HELLO_VERSION"), "the version it reports (default $HELLO_VERSION, else 1)")
	flag.Parse()
	if *version == "" {
		*version = "1"
	}
	log.SetPrefix("hello-grpc: ")
	log.SetFlags(0)

	ln, err := ally.Listen("tcp", *listen)
	if err != nil {
		log.Fatal(err)
	}
	pid := os.Getpid()
	log.Printf("listening on %s version=%s pid=%d generation=%d", ln.Addr(), *version, pid, ally.Generation())

	s := grpc.NewServer()
	s.RegisterService(&greeterDesc, &greeter{version: *version, pid: uint32(pid), generation: ally.Generation()})
	hs := health.NewServer()
	healthpb.RegisterHealthServer(s, hs)

	if err := ally.Ready(); err != nil {
		log.Fatal(err)
	}
	go func() {
		<-ally.Stopping()
		log.Printf("stopping pid=%d", pid)
		// Tells health-checking balancers to go elsewhere; calls that still come
		// are served until the drain ends.
		hs.Shutdown()
	}()
	if err := allygrpc.Serve(s, ln); err != nil {
		log.Fatal(err)
	}
	log.Printf("stopped pid=%d", pid)
}

type greeter struct {
	version    string
	pid        uint32
	generation uint64
}

func (g *greeter) hello(_ context.Context, in *helloRequest) (*helloReply, error) {
	return &helloReply{
		Message:    fmt.Sprintf("hello %s version=%s", in.Name, g.version),
		Pid:        g.pid,
		Generation: g.generation,
	}, nil
}

// The hello.Greeter service, written out as protoc-gen-go-grpc would.
var greeterDesc = grpc.ServiceDesc{
	ServiceName: "hello.Greeter",
	HandlerType: (*interface{})(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Hello",
		Handler: func(srv interface{}, ctx context.Context, dec func(interface{}) error, interceptor grpc.UnaryServerInterceptor) (interface{}, error) {
			in := new(helloRequest)
			if err := dec(in); err != nil {
				return nil, err
			}
			g := srv.(*greeter)
			if interceptor == nil {
				return g.hello(ctx, in)
			}
			info := &grpc.UnaryServerInfo{Server: srv, FullMethod: "/hello.Greeter/Hello"}
			return interceptor(ctx, in, info, func(ctx context.Context, req interface{}) (interface{}, error) {
				return g.hello(ctx, req.(*helloRequest))
			})
		},
	}},
	Metadata: "hello.proto",
}

// helloRequest and helloReply are the Greeter's protobuf messages, described by
// their struct tags as protoc-gen-go's output once was; the protobuf runtime
// marshals them by reflection.
type helloRequest struct {
	Name string `protobuf:"bytes,1,opt,name=name,proto3" json:"name,omitempty"`
}

func (m *helloRequest) Reset()         { *m = helloRequest{} }
func (m *helloRequest) String() string { return fmt.Sprintf("name:%q", m.Name) }
func (*helloRequest) ProtoMessage()    {}

type helloReply struct {
	Message    string `protobuf:"bytes,1,opt,name=message,proto3" json:"message,omitempty"`
	Pid        uint32 `protobuf:"varint,2,opt,name=pid,proto3" json:"pid,omitempty"`
	Generation uint64 `protobuf:"varint,3,opt,name=generation,proto3" json:"generation,omitempty"`
}

func (m *helloReply) Reset() { *m = helloReply{} }
func (m *helloReply) String() string {
	return fmt.Sprintf("message:%q pid:%d generation:%d", m.Message, m.Pid, m.Generation)
}
func (*helloReply) ProtoMessage() {}
