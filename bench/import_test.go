package bench

// BenchmarkImport: snapfs import against qemu-img convert and the
// parallel-GET limit, and demand-read latency during hydration.
// Run: go test ./bench -run '^$' -bench Import -benchtime 1x -timeout 60m
// (SNAPFS_BENCH_QUICK=1 for 256 MiB images; SNAPFS_BENCH_WRITE=1 appends
// the table to RESULTS.md).

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"github.com/snapfs/snapfs/tests/harness"
)

// compressibleDisk writes a writeDisk disk whose data is text that zlib
// shrinks about threefold.
func compressibleDisk(tb testing.TB, path string, size int64) {
	rng := rand.New(rand.NewPCG(1, 2))
	writeDisk(tb, path, size, func(p []byte) {
		for o := 0; o < len(p); o += 1 << 20 {
			copy(p[o:], textCorpus(rng)[:1<<20])
		}
	})
}

func BenchmarkImport(b *testing.B) {
	for _, tool := range []string{"qemu-img"} {
		if _, err := exec.LookPath(tool); err != nil {
			b.Skipf("%s not installed", tool)
		}
	}
	size, mode := int64(2<<30), "full"
	if os.Getenv("SNAPFS_BENCH_QUICK") == "1" {
		size, mode = 256<<20, "quick"
	}
	began, load0 := time.Now(), loadAvg()
	dir := b.TempDir()
	out := b.TempDir()
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		out, _ = os.MkdirTemp("/dev/shm", "snapfs-bench-")
		defer os.RemoveAll(out)
	}
	bin := os.Getenv("SNAPFS_BENCH_BIN")
	if bin == "" {
		bin = buildSnapfs(b, dir)
	}

	m := harness.StartMinIO(b)
	m.MakeBucket(b, "bench")
	m.MakePublic(b, "bench")
	type image struct {
		name, key string
		obj       int64
	}
	var imgs []image
	for _, c := range []struct {
		name, key string
		make      func(testing.TB, string, int64)
		args      []string
	}{
		{"random data", "plain.qcow2", benchDisk, nil},
		{"text, zlib-compressed", "zlib.qcow2", compressibleDisk, []string{"-c", "-o", "compression_type=zlib"}},
	} {
		raw := filepath.Join(dir, "src.raw")
		c.make(b, raw, size)
		q := filepath.Join(dir, c.key)
		if o, err := exec.Command("qemu-img", append(append([]string{"convert", "-O", "qcow2"}, c.args...), raw, q)...).CombinedOutput(); err != nil {
			b.Fatalf("qemu-img convert: %v\n%s", err, o)
		}
		os.Remove(raw)
		fi, _ := os.Stat(q)
		m.Upload(b, "bench", c.key, q)
		os.Remove(q)
		imgs = append(imgs, image{c.name, c.key, fi.Size()})
	}
	px, err := startLatencyProxy(m.Endpoint)
	if err != nil {
		b.Fatal(err)
	}
	defer px.stop()
	var env []string
	for _, kv := range m.Env() {
		if strings.HasPrefix(kv, "AWS_ENDPOINT_URL=") {
			kv = "AWS_ENDPOINT_URL=http://" + px.addr
		}
		env = append(env, kv)
	}
	// At 0 ms everyone talks to MinIO directly (qemu's curl driver stalls
	// behind toxiproxy without a toxic); at 10 ms through the proxy.
	type route struct {
		env  []string
		rm   remote
		addr string
	}
	routes := map[int]route{0: {m.Env(), minioRemote(m, m.Endpoint), m.Endpoint}, 10: {env, minioRemote(m, px.addr), px.addr}}

	var rows []string
	row := func(format string, args ...any) {
		r := fmt.Sprintf(format, args...)
		rows = append(rows, r)
		fmt.Println(r)
	}
	row("| image | latency | limit (16 x 8 MiB GETs from another process, best of 2) | snapfs import (best of 2) | qemu-img convert -O raw (http) | import / limit | import / qemu-img |")
	row("|---|---|---|---|---|---|---|")
	mbps := func(n int64, d time.Duration) float64 { return float64(n) / d.Seconds() / 1e6 }
	b.ResetTimer()
	for _, lat := range []int{0, 10} {
		if err := px.setLatency(lat); err != nil {
			b.Fatal(err)
		}
		rt := routes[lat]
		for _, img := range imgs {
			limit := min(seqLimit(b, rt.rm, "bench", img.key, img.obj, 8<<20, 16), seqLimit(b, rt.rm, "bench", img.key, img.obj, 8<<20, 16))
			target := filepath.Join(out, "vol.raw")
			os.Remove(target)
			os.Remove(target + ".snapfs-state")
			// Best of two imports, as the limit is the best of two runs:
			// single runs here vary by 10-20%.
			var tImp time.Duration
			var stalled bool
			for range 2 {
				d, st := runWatched(b, rt.env, target, bin, "import", "s3://bench/"+img.key, target)
				os.Remove(target)
				os.Remove(target + ".snapfs-state")
				if tImp == 0 || d < tImp {
					tImp = d
				}
				stalled = stalled || st
			}
			src := fmt.Sprintf(`json:{"driver":"qcow2","file":{"driver":"http","url":%q}}`, "http://"+rt.addr+"/bench/"+img.key)
			dst := filepath.Join(out, "qemu.raw")
			tQemu, qStalled := runWatched(b, nil, dst, "qemu-img", "convert", "-O", "raw", src, dst)
			os.Remove(dst)
			note := ""
			if stalled || qStalled {
				note = " (stalled)"
			}
			row("| %s, %d MiB object | %d ms | %.0f MB/s | %.0f MB/s | %.0f MB/s | %.2f | %.2f%s |", img.name, img.obj>>20, lat,
				mbps(img.obj, limit), mbps(img.obj, tImp), mbps(img.obj, tQemu), limit.Seconds()/tImp.Seconds(), tQemu.Seconds()/tImp.Seconds(), note)
		}
	}

	// 4 KiB demand reads at random offsets of the plain image: through
	// `import --serve nbd` while the pass runs at full speed, and through
	// `serve --volume` (copy-on-read, no pass) on a fresh volume.
	row("")
	row("| latency | 4 KiB demand reads, serve --volume (no hydration), median | during full-speed hydration, median (reads) | ratio |")
	row("|---|---|---|---|")
	for _, lat := range []int{0, 10} {
		if err := px.setLatency(lat); err != nil {
			b.Fatal(err)
		}
		base := demandLatencies(b, bin, routes[lat].env, out, false, size, 40)
		hyd := demandLatencies(b, bin, routes[lat].env, out, true, size, 40)
		if len(base) == 0 || len(hyd) == 0 {
			row("| %d ms | - | - (%d reads during hydration) | - |", lat, len(hyd))
			continue
		}
		mb, mh := median(base), median(hyd)
		row("| %d ms | %.2f ms | %.2f ms (%d) | %.2f |", lat, ms(mb), ms(mh), len(hyd), mh.Seconds()/mb.Seconds())
	}
	b.StopTimer()
	_ = px.setLatency(0)
	header := fmt.Sprintf("BenchmarkImport (%s mode, %d MiB virtual disks), run took %s, load average %s at the start, %s at the end",
		mode, size>>20, time.Since(began).Round(time.Second), load0, loadAvg())
	legend := "Targets (issue 5): import >= 0.85 x limit at 0 and 10 ms and >= 3 x qemu-img at 10 ms; zlib image >= 3 x qemu-img; demand reads during hydration at most 2 x slower at the median."
	fmt.Printf("\n%s\n%s\n", header, legend)
	if os.Getenv("SNAPFS_BENCH_WRITE") == "1" {
		writeResults(b, header, strings.Join(rows, "\n")+"\n\n"+legend)
	}
}

func ms(d time.Duration) float64 { return float64(d) / 1e6 }

// demandLatencies serves the plain image through a fresh volume (with the
// background pass when hydrate) and times n 4 KiB reads at random offsets,
// each on a new connection, 20 ms apart; with hydrate only the reads done
// before the volume completed count.
func demandLatencies(b *testing.B, bin string, env []string, out string, hydrate bool, size int64, n int) []time.Duration {
	b.Helper()
	ps := &procSet{procs: map[*proc]bool{}, dir: b.TempDir()}
	defer ps.killAll()
	target := filepath.Join(out, "lat.raw")
	os.Remove(target)
	os.Remove(target + ".snapfs-state")
	defer os.Remove(target)
	defer os.Remove(target + ".snapfs-state")
	addr, err := freeAddr()
	if err != nil {
		b.Fatal(err)
	}
	args := []string{"serve", "--volume", target, "--listen", addr, "s3://bench/plain.qcow2"}
	if hydrate {
		args = []string{"import", "--serve", "nbd", "--listen", addr, "s3://bench/plain.qcow2", target}
	}
	s, err := ps.startNBD(addr, "plain.qcow2", time.Minute, env, bin, args...)
	if err != nil {
		b.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(uint64(size), 7))
	var lat []time.Duration
	for range n {
		if hydrate && volumeComplete(target) {
			break
		}
		off := uint64(rng.Int64N(size/4096)) * 4096
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		t0 := time.Now()
		err := nbdRead4KAt(ctx, s.addr, "plain.qcow2", off)
		d := time.Since(t0)
		cancel()
		if err != nil {
			b.Logf("read at %d: %v", off, err)
			continue
		}
		lat = append(lat, d)
		time.Sleep(20 * time.Millisecond)
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	return lat
}

// volumeComplete reads the state file's complete flag, as snapfs status does.
func volumeComplete(target string) bool {
	b, err := os.ReadFile(target + ".snapfs-state")
	return err == nil && strings.Contains(string(b), `"complete":true`)
}
