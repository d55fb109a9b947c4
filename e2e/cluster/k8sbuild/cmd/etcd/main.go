// Command etcd is etcd's own server entry point, built from the same go.etcd.io/etcd/server/v3 release
// that k8s.io/kubernetes v1.37.2 is tested against (Debian's etcd-server 3.4 is older than it supports).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
