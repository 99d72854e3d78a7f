package main

import (
	"io"
	"log"
	"net/http"
)

func serveAlly(addr string, h http.Handler) { log.Fatal("todo") }
func stateCalls(in io.Reader, out io.Writer)  { log.Fatal("todo") }
