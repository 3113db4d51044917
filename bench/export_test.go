package bench

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snapfs/snapfs/tests/harness"
)

// BenchmarkExport compares `snapfs export` of the benchmark disk (a raw
// file: 4 GiB, random data in two thirds of it; SNAPFS_BENCH_QUICK=1: 256
// MiB) into MinIO with `qemu-img convert -O qcow2` (and `-c` for the
// compressed rows) to a local file followed by an upload of that file, and
// with a plain multipart upload of the raw file (the limit). Rows:
// uncompressed, zlib, zstd. Run: go test ./bench -run '^$' -bench Export
// -benchtime 1x -timeout 60m
func BenchmarkExport(b *testing.B) {
	if _, err := exec.LookPath("qemu-img"); err != nil {
		b.Skip("qemu-img not installed (scripts/test-deps installs it)")
	}
	size := int64(4 << 30)
	if os.Getenv("SNAPFS_BENCH_QUICK") == "1" {
		size = 256 << 20
	}
	dir := b.TempDir()
	snapfs := buildSnapfs(b, dir)
	raw := filepath.Join(dir, "disk.raw")
	benchDisk(b, raw, size)
	var st syscall.Stat_t
	if err := syscall.Stat(raw, &st); err != nil {
		b.Fatal(err)
	}
	alloc := st.Blocks * 512

	m := harness.StartMinIO(b)
	m.MakeBucket(b, "bench")
	cl := m.Client(b)
	ctx := context.Background()
	upload := func(key, path string) time.Duration {
		start := time.Now()
		if _, err := cl.FPutObject(ctx, "bench", key, path, minio.PutObjectOptions{}); err != nil {
			b.Fatalf("upload %s: %v", path, err)
		}
		d := time.Since(start)
		_ = cl.RemoveObject(ctx, "bench", key, minio.RemoveObjectOptions{})
		return d
	}
	run := func(env []string, name string, args ...string) time.Duration {
		cmd := exec.Command(name, args...)
		cmd.Env = append(os.Environ(), env...)
		start := time.Now()
		if out, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
		}
		return time.Since(start)
	}
	// qemu-img convert to a local file, then the upload of that file.
	qemuThenUpload := func(args ...string) (conv, up time.Duration, objSize int64) {
		img := filepath.Join(dir, "qemu.qcow2")
		conv = run(nil, "qemu-img", append(append([]string{"convert", "-f", "raw", "-O", "qcow2"}, args...), raw, img)...)
		fi, err := os.Stat(img)
		if err != nil {
			b.Fatal(err)
		}
		up = upload("qemu.qcow2", img)
		os.Remove(img)
		return conv, up, fi.Size()
	}
	// snap runs snapfs export; besides the wall time it returns the
	// streaming time from the summary, without the pass that hashes the
	// source first (so that the digest metadata goes in with the upload).
	snap := func(mode string) (time.Duration, time.Duration, int64) {
		key := "snapfs-" + mode + ".qcow2"
		cmd := exec.Command(snapfs, "export", raw, "s3://bench/"+key, "--compress", mode, "--progress=false")
		cmd.Env = append(os.Environ(), m.Env()...)
		start := time.Now()
		out, err := cmd.CombinedOutput()
		d := time.Since(start)
		if err != nil {
			b.Fatalf("snapfs export: %v\n%s", err, out)
		}
		var streamed float64
		if _, rest, ok := strings.Cut(string(out), "streaming "); ok {
			fmt.Sscanf(rest, "%fs", &streamed)
		}
		info, err := cl.StatObject(ctx, "bench", key, minio.StatObjectOptions{})
		if err != nil {
			b.Fatal(err)
		}
		_ = cl.RemoveObject(ctx, "bench", key, minio.RemoveObjectOptions{})
		return d, time.Duration(streamed * float64(time.Second)), info.Size
	}

	b.ResetTimer()
	load := loadAvg()
	tLimit := upload("raw", raw)
	tSnap, sSnap, snapSize := snap("none")
	tConv, tUp, qSize := qemuThenUpload()
	tLimit2 := upload("raw", raw)
	tLimit = min(tLimit, tLimit2) // the better of two measurements bounds the rest
	tZlib, sZlib, zlibSize := snap("zlib")
	tZstd, sZstd, zstdSize := snap("zstd")
	tConvC, tUpC, qcSize := qemuThenUpload("-c")
	b.StopTimer()

	limitRate := float64(size) / tLimit.Seconds() // bytes/s the upload moves
	xLimit := func(d time.Duration) float64 { return float64(alloc) / d.Seconds() / limitRate }
	fmt.Printf("\nexport of a %d MiB raw disk (%d MiB allocated, random data) into MinIO on loopback, 1 round, load average %s (start) %s (end):\n",
		size>>20, alloc>>20, load, loadAvg())
	fmt.Printf("| exporter | time | object MiB | allocated MB/s | x limit | target |\n|---|---|---|---|---|---|\n")
	fmt.Printf("| plain multipart upload of the raw file (limit, minio-go FPutObject) | %.2fs | %d | %.0f | 1.00 | - |\n",
		tLimit.Seconds(), size>>20, limitRate/1e6)
	row := func(name string, d time.Duration, obj int64, target string) {
		fmt.Printf("| %s | %.2fs | %d | %.0f | %.2f | %s |\n", name, d.Seconds(), obj>>20, float64(alloc)/d.Seconds()/1e6, xLimit(d), target)
	}
	row("snapfs export", tSnap, snapSize, fmt.Sprintf(">= 0.85 x limit: %s", yes(xLimit(tSnap) >= 0.85)))
	row("snapfs export, streaming only (without the source hash pass)", sSnap, snapSize, fmt.Sprintf(">= 0.85 x limit: %s", yes(xLimit(sSnap) >= 0.85)))
	row(fmt.Sprintf("qemu-img convert -O qcow2 (%.1fs) + upload (%.1fs)", tConv.Seconds(), tUp.Seconds()), tConv+tUp, qSize, "-")
	cPeer := tConvC + tUpC
	row(fmt.Sprintf("snapfs export --compress zlib (%.2f x peer time)", tZlib.Seconds()/cPeer.Seconds()), tZlib, zlibSize,
		fmt.Sprintf("<= 0.25 x peer: %s", yes(tZlib.Seconds() <= 0.25*cPeer.Seconds())))
	row(fmt.Sprintf("snapfs export --compress zstd (%.2f x peer time)", tZstd.Seconds()/cPeer.Seconds()), tZstd, zstdSize,
		fmt.Sprintf("<= 0.25 x peer: %s", yes(tZstd.Seconds() <= 0.25*cPeer.Seconds())))
	row(fmt.Sprintf("snapfs export --compress zlib, streaming only (%.2f x peer time)", sZlib.Seconds()/cPeer.Seconds()), sZlib, zlibSize,
		fmt.Sprintf("<= 0.25 x peer: %s", yes(sZlib.Seconds() <= 0.25*cPeer.Seconds())))
	row(fmt.Sprintf("snapfs export --compress zstd, streaming only (%.2f x peer time)", sZstd.Seconds()/cPeer.Seconds()), sZstd, zstdSize,
		fmt.Sprintf("<= 0.25 x peer: %s", yes(sZstd.Seconds() <= 0.25*cPeer.Seconds())))
	row(fmt.Sprintf("qemu-img convert -c -O qcow2 (%.1fs) + upload (%.1fs) (compressed peer)", tConvC.Seconds(), tUpC.Seconds()), cPeer, qcSize, "-")
	b.ReportMetric(xLimit(tSnap), "snapfs/limit")
	b.ReportMetric(cPeer.Seconds()/min(tZlib, tZstd).Seconds(), "qemu-c/snapfs-c")
}

func yes(ok bool) string {
	if ok {
		return "yes"
	}
	return "**NO**"
}
