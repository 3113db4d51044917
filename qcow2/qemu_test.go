package qcow2

import (
	"context"
	"fmt"
	"testing"
)

// Images made by qemu-img/qemu-io, read back and compared with
// `qemu-img convert -O raw` and `qemu-img map`.

func TestQemuVersionsAndClusterSizes(t *testing.T) {
	needQemu(t)
	for _, compat := range []string{"0.10", "1.1"} {
		for _, cs := range []string{"512", "4k", "64k", "2M"} {
			t.Run(fmt.Sprintf("compat=%s/cluster=%s", compat, cs), func(t *testing.T) {
				dir := t.TempDir()
				size := "8M"
				if cs == "2M" {
					size = "20M"
				}
				run(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat="+compat+",cluster_size="+cs, "img.qcow2", size)
				qio(t, dir, "img.qcow2", "qcow2",
					"write -P 0x11 0 64k",
					"write -P 0x22 1000k 1536",
					"write -P 0x33 3M 1M",
					"write -P 0x44 7680k 100k",
					"write -z 3200k 4k",
				)
				im := checkAgainstQemu(t, dir, "img.qcow2")
				in, err := im.Info(context.Background())
				if err != nil {
					t.Fatal(err)
				}
				if in.Compat != compat || in.Servable != true || in.AllocatedBytes == 0 {
					t.Fatalf("Info = %+v", in)
				}
			})
		}
	}
}
