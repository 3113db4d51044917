// Package bench measures snapfs against peers on the same machine, in the
// same run, and prints ratios. Run: go test ./bench -run '^$' -bench Cat -benchtime 1x -timeout 30m (and -bench NBD: see nbd_test.go)
package bench

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	"github.com/snapfs/snapfs/tests/harness"
)

// BenchmarkCat compares `snapfs cat` of a QCOW2 object in MinIO with
// `qemu-img convert -O raw` of the same object over http (qemu's curl
// driver), and with the parallel-GET limit, interleaved, three rounds.
func BenchmarkCat(b *testing.B) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		b.Skip("qemu-img not installed (scripts/test-deps installs it)")
	}
	dir := b.TempDir()
	out := b.TempDir()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		out, _ = os.MkdirTemp("/dev/shm", "snapfs-bench-")
		defer os.RemoveAll(out)
	}
	snapfs := buildSnapfs(b, dir)
	const size = 2 << 30
	raw := filepath.Join(dir, "disk.raw")
	benchDisk(b, raw, size)
	img := filepath.Join(dir, "disk.qcow2")
	if o, err := exec.Command("qemu-img", "convert", "-O", "qcow2", raw, img).CombinedOutput(); err != nil {
		b.Fatalf("qemu-img convert: %v\n%s", err, o)
	}
	os.Remove(raw)
	fi, err := os.Stat(img)
	if err != nil {
		b.Fatal(err)
	}
	objSize := fi.Size()

	m := harness.StartMinIO(b)
	m.MakeBucket(b, "bench")
	m.MakePublic(b, "bench")
	m.Upload(b, "bench", "disk.qcow2", img)
	os.Remove(img)
	httpURL := m.URL("bench", "disk.qcow2")
	qemuSrc := fmt.Sprintf(`json:{"driver":"qcow2","file":{"driver":"http","url":%q}}`, httpURL)

	type peer struct {
		name   string
		env    []string
		argv   []string
		times  []time.Duration
		stalls int
	}
	peers := []*peer{
		{name: "snapfs cat -o FILE", env: m.Env(), argv: []string{snapfs, "cat", "s3://bench/disk.qcow2", "-o", "OUT"}},
		{name: "qemu-img convert -O raw, http driver, -m 1", argv: []string{"qemu-img", "convert", "-m", "1", "-O", "raw", qemuSrc, "OUT"}},
		{name: "qemu-img convert -O raw, http driver, default -m 8", argv: []string{"qemu-img", "convert", "-O", "raw", qemuSrc, "OUT"}},
	}
	var tLimit []time.Duration
	b.ResetTimer()
	for i := 0; i < 3*b.N; i++ {
		tLimit = append(tLimit, seqLimit(b, minioRemote(m, m.Endpoint), "bench", "disk.qcow2", objSize, 8<<20, 8))
		for _, p := range peers {
			dst := filepath.Join(out, "out.raw")
			argv := append([]string(nil), p.argv...)
			argv[len(argv)-1] = dst
			d, stalled := runWatched(b, p.env, dst, argv[0], argv[1:]...)
			os.Remove(dst)
			if stalled {
				p.stalls++
			} else {
				p.times = append(p.times, d)
			}
		}
	}
	b.StopTimer()
	mbps := func(d time.Duration) float64 { return float64(objSize) / d.Seconds() / 1e6 }
	ls := median(tLimit)
	fmt.Printf("\ncat of a %d MiB QCOW2 object (%d MiB virtual, random data), MinIO on loopback, %d rounds, medians of the runs that finished:\n", objSize>>20, size>>20, len(tLimit))
	fmt.Printf("| reader | time | MB/s of object | x limit | stalled runs |\n|---|---|---|---|---|\n")
	fmt.Printf("| parallel ranged GETs (limit, 8 x 8 MiB) | %.2fs | %.0f | 1.00 | 0 |\n", ls.Seconds(), mbps(ls))
	for _, p := range peers {
		if len(p.times) == 0 {
			fmt.Printf("| %s | - | - | - | %d |\n", p.name, p.stalls)
			continue
		}
		d := median(p.times)
		fmt.Printf("| %s | %.2fs | %.0f | %.2f | %d |\n", p.name, d.Seconds(), mbps(d), ls.Seconds()/d.Seconds(), p.stalls)
	}
	if s, q := peers[0], peers[1]; len(s.times) > 0 && len(q.times) > 0 {
		r := median(q.times).Seconds() / median(s.times).Seconds()
		fmt.Printf("snapfs cat throughput = %.2f x qemu-img convert (-m 1) from the same object\n", r)
		b.ReportMetric(r, "snapfs/qemu")
	}
	if peers[0].stalls > 0 {
		b.Errorf("snapfs cat stalled in %d runs", peers[0].stalls)
	}
}
