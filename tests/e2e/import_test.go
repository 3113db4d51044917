package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"math/rand"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"
	"golang.org/x/sys/unix"

	"github.com/snapfs/snapfs/tests/harness"
	"github.com/snapfs/snapfs/tests/images"
)

// importImage is an image in MinIO for the import tests, with its raw
// reference.
type importImage struct {
	url  string // s3://bucket/key
	key  string
	ref  *serveRef
	file string // the local image file
}

// importSetup starts MinIO and uploads the images of the corpus named,
// with their backing files, under bucket "imp".
func importSetup(t *testing.T, names ...string) (*harness.MinIO, map[string]importImage) {
	t.Helper()
	dir, corpus, _ := imageSet(t)
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "imp")
	out := map[string]importImage{}
	for _, n := range names {
		im := byName(t, corpus, n)
		for _, f := range im.Files {
			m.Upload(t, "imp", f, filepath.Join(dir, f))
		}
		out[n] = importImage{url: "s3://imp/" + im.Key, key: im.Key, ref: rawRef(t, dir, im.Key), file: filepath.Join(dir, im.Key)}
	}
	return m, out
}

// volumeStatus runs snapfs status --json on target.
func volumeStatus(t *testing.T, target string) (map[string]any, int) {
	t.Helper()
	res := snapfs(t, "status", "--json", target)
	var st map[string]any
	if err := json.Unmarshal(res.stdout, &st); err != nil {
		t.Fatalf("status --json: %v\n%s", err, res)
	}
	return st, res.code
}

// checkSparse fails unless every granule-aligned 64 KiB run that qemu-img
// map calls a hole is a hole (SEEK_DATA skips it) in target.
func checkSparse(t *testing.T, target string, ref *serveRef) {
	t.Helper()
	f, err := os.Open(target)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const g = 64 << 10
	var holes, checked int64
	for _, e := range ref.mapping {
		if e.Data {
			continue
		}
		s, end := (e.Start+g-1)/g*g, (e.Start+e.Length)/g*g
		if s >= end {
			continue
		}
		holes += end - s
		d, err := unix.Seek(int(f.Fd()), s, unix.SEEK_DATA)
		if err != nil && !errors.Is(err, unix.ENXIO) {
			t.Fatal(err)
		}
		if err == nil && d < end {
			t.Errorf("%s: data at %d inside the image's hole [%d, %d)", target, d, s, end)
			return
		}
		checked++
	}
	var fst syscall.Stat_t
	syscall.Fstat(int(f.Fd()), &fst)
	t.Logf("%s: %d holes (%d bytes) checked; %d bytes allocated of %d", filepath.Base(target), checked, holes, fst.Blocks*512, ref.size)
}

// TestImport: the result equals qemu-img convert and is sparse where the
// image is, for plain, compressed (zlib, zstd) and backing-chain images;
// the object's raw sha256 is checked; a changed object and a smaller
// target are refused; a full disk stops with a clear error and resumes.
func TestImport(t *testing.T) {
	t.Parallel()
	names := []string{"v3-64k", "zlib-64k", "zstd-64k", "chain", "v3-4k", "odd-size", "extl2", "v3-2m"}
	m, ims := importSetup(t, names...)
	env := m.Env()
	out := t.TempDir()

	for _, n := range names {
		im := ims[n]
		target := filepath.Join(out, n+".raw")
		res := runCLI(t, cliRun{args: []string{"import", im.url, target}, env: env})
		if res.code != 0 {
			t.Fatalf("import %s: %s", n, res)
		}
		if got := sha256File(t, target); got != im.ref.sha256 {
			t.Errorf("%s: imported sha256 %s, qemu-img convert %s", n, got, im.ref.sha256)
		}
		checkSparse(t, target, im.ref)
		st, code := volumeStatus(t, target)
		if code != 0 || st["complete"] != true || st["url"] != "s3://imp/"+im.key {
			t.Errorf("%s: status exit %d, %v", n, code, st)
		}
	}

	c := m.Client(t)
	put := func(key, file string, meta map[string]string) {
		if _, err := c.FPutObject(context.Background(), "imp", key, file, minio.PutObjectOptions{UserMetadata: meta}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("digest", func(t *testing.T) {
		im := ims["zlib-64k"]
		put("digest-ok.qcow2", im.file, map[string]string{"snapfs-raw-sha256": im.ref.sha256})
		put("digest-bad.qcow2", im.file, map[string]string{"snapfs-raw-sha256": strings.Repeat("0", 64)})
		ok := filepath.Join(out, "digest-ok.raw")
		res := runCLI(t, cliRun{args: []string{"--log-level", "info", "import", "s3://imp/digest-ok.qcow2", ok}, env: env})
		if res.code != 0 || !strings.Contains(res.stderr, "verified") {
			t.Fatalf("import with the right digest: %s", res)
		}
		// What snapfs export writes, snapfs import verifies.
		res = runCLI(t, cliRun{args: []string{"export", "--compress", "zstd", ims["chain"].ref.raw, "s3://imp/exported.qcow2"}, env: env})
		if res.code != 0 {
			t.Fatalf("export: %s", res)
		}
		exp := filepath.Join(out, "exported.raw")
		res = runCLI(t, cliRun{args: []string{"--log-level", "info", "import", "s3://imp/exported.qcow2", exp}, env: env})
		if res.code != 0 || !strings.Contains(res.stderr, "verified") || sha256File(t, exp) != ims["chain"].ref.sha256 {
			t.Fatalf("import of an exported image: %s", res)
		}
		bad := filepath.Join(out, "digest-bad.raw")
		res = runCLI(t, cliRun{args: []string{"import", "s3://imp/digest-bad.qcow2", bad}, env: env})
		if res.code == 0 || !strings.Contains(res.stderr, "does not match the image's raw sha256") {
			t.Fatalf("import with a wrong digest: %s", res)
		}
		if st, code := volumeStatus(t, bad); code != 3 || st["complete"] != false {
			t.Errorf("a volume failing its digest: status exit %d, %v", code, st)
		}
	})

	t.Run("changed", func(t *testing.T) {
		target := filepath.Join(out, "v3-64k.raw")
		before := sha256File(t, target)
		put("v3-64k.qcow2", ims["v3-4k"].file, nil) // another object under the same key
		res := runCLI(t, cliRun{args: []string{"import", ims["v3-64k"].url, target}, env: env})
		if res.code == 0 || !strings.Contains(res.stderr, "the object changed") || !strings.Contains(res.stderr, "refusing to mix versions") {
			t.Fatalf("import against a changed object: %s", res)
		}
		if sha256File(t, target) != before {
			t.Error("the refused import changed the target")
		}
	})

	t.Run("smaller", func(t *testing.T) {
		target := filepath.Join(out, "small.raw")
		res := runCLI(t, cliRun{args: []string{"import", "--size", "1MiB", ims["zstd-64k"].url, target}, env: env})
		if res.code == 0 || !strings.Contains(res.stderr, "smaller than the image's virtual size") {
			t.Fatalf("import into a smaller target: %s", res)
		}
		if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
			t.Error("the refused import created the target")
		}
		// A larger one reads as zeros past the image.
		big := filepath.Join(out, "big.raw")
		res = runCLI(t, cliRun{args: []string{"import", "--size", "40MiB", ims["zstd-64k"].url, big}, env: env})
		if res.code != 0 {
			t.Fatalf("import into a larger target: %s", res)
		}
		b, _ := os.ReadFile(big)
		want, _ := os.ReadFile(ims["zstd-64k"].ref.raw)
		if len(b) != 40<<20 || !bytes.Equal(b[:len(want)], want) || !allZero(b[len(want):]) {
			t.Error("a larger target is not the image followed by zeros")
		}
	})

	// A block device (a loop device over a file full of 0xff): holes are
	// written as zeros, and a device smaller than the image is refused.
	t.Run("blockdev", func(t *testing.T) {
		loop := func(size int64) string {
			f := filepath.Join(t.TempDir(), "dev.img")
			if err := os.WriteFile(f, bytes.Repeat([]byte{0xff}, int(size)), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("losetup", "-f", "--show", f).CombinedOutput()
			if err != nil {
				t.Skipf("no loop device: %v %s", err, out)
			}
			dev := strings.TrimSpace(string(out))
			t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
			return dev
		}
		im := ims["zstd-64k"] // 24 MiB
		small := loop(16 << 20)
		res := runCLI(t, cliRun{args: []string{"import", "--state", filepath.Join(t.TempDir(), "s"), im.url, small}, env: env})
		if res.code == 0 || !strings.Contains(res.stderr, "smaller than the") {
			t.Fatalf("import into a smaller device: %s", res)
		}
		dev := loop(30 << 20)
		state := filepath.Join(t.TempDir(), "dev.state")
		res = runCLI(t, cliRun{args: []string{"import", "--state", state, im.url, dev}, env: env})
		if res.code != 0 {
			t.Fatalf("import into %s: %s", dev, res)
		}
		got := make([]byte, im.ref.size)
		f, err := os.Open(dev)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := io.ReadFull(f, got); err != nil {
			t.Fatal(err)
		}
		want, _ := os.ReadFile(im.ref.raw)
		if d := firstDiff(got, want); d != "" {
			t.Fatalf("the device differs from qemu-img convert: %s", d)
		}
	})

	t.Run("fulldisk", func(t *testing.T) {
		mnt := t.TempDir()
		if err := syscall.Mount("tmpfs", mnt, "tmpfs", 0, "size=4m"); err != nil {
			t.Skipf("cannot mount a tmpfs: %v", err)
		}
		defer syscall.Unmount(mnt, syscall.MNT_DETACH)
		target := filepath.Join(mnt, "full.raw")
		state := filepath.Join(t.TempDir(), "full.state")
		ldir := t.TempDir()
		images.Large(t, ldir, "large.qcow2", 24<<20, 3)
		m.Upload(t, "imp", "large.qcow2", filepath.Join(ldir, "large.qcow2"))
		im := importImage{url: "s3://imp/large.qcow2", ref: rawRef(t, ldir, "large.qcow2")}
		res := runCLI(t, cliRun{args: []string{"import", "--state", state, im.url, target}, env: env})
		if res.code == 0 || !strings.Contains(res.stderr, "no space left on device") || !strings.Contains(res.stderr, target) || !strings.Contains(res.stderr, "resume") {
			t.Fatalf("import onto a full disk: %s", res)
		}
		sres := snapfs(t, "status", "--state", state, target)
		if sres.code != 3 || !strings.Contains(string(sres.stdout), "filling") {
			t.Fatalf("status after the full disk: %s\n%s", sres, sres.stdout)
		}
		if err := syscall.Mount("tmpfs", mnt, "tmpfs", syscall.MS_REMOUNT, "size=80m"); err != nil {
			t.Fatal(err)
		}
		res = runCLI(t, cliRun{args: []string{"import", "--state", state, im.url, target}, env: env})
		if res.code != 0 {
			t.Fatalf("resume after the disk was grown: %s", res)
		}
		if got := sha256File(t, target); got != im.ref.sha256 {
			t.Errorf("resumed import sha256 %s, want %s", got, im.ref.sha256)
		}
	})
}

func allZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// countingProxy forwards TCP connections to target and counts the bytes
// the target sends back: what the client fetched, headers included.
type countingProxy struct {
	l    net.Listener
	down atomic.Int64
	wg   sync.WaitGroup
}

func startProxy(t *testing.T, target string) *countingProxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &countingProxy{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				defer c.Close()
				s, err := net.Dial("tcp", target)
				if err != nil {
					return
				}
				defer s.Close()
				go func() { io.Copy(s, c); s.(*net.TCPConn).CloseWrite() }()
				// Counted as read from MinIO, before the client can have
				// it: a count taken once the copy ends would miss the
				// connections MinIO keeps open after the client exits.
				io.Copy(c, countingReader{s, &p.down})
			}()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return p
}

// countingReader adds the bytes it reads to n.
type countingReader struct {
	r io.Reader
	n *atomic.Int64
}

func (c countingReader) Read(p []byte) (int, error) {
	k, err := c.r.Read(p)
	c.n.Add(int64(k))
	return k, err
}

// proxyEnv is env with the S3 endpoint replaced by the proxy's.
func proxyEnv(env []string, p *countingProxy) []string {
	var out []string
	for _, kv := range env {
		if strings.HasPrefix(kv, "AWS_ENDPOINT_URL=") {
			kv = "AWS_ENDPOINT_URL=http://" + p.l.Addr().String()
		}
		out = append(out, kv)
	}
	return out
}

// TestImportKill9: the importer killed with SIGKILL at 20 random moments,
// then run to the end: the result is byte-exact, and the bytes fetched in
// all (counted by a TCP proxy in front of MinIO, HTTP headers and
// metadata included) stay within 1.05 x the allocated bytes plus, per
// kill, one flush batch and the reads in flight.
func TestImportKill9(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	// 64 MiB at 2 MiB/s: 20 runs of 0.3-1.5 s copy less than half of it,
	// however quiet the machine.
	const size = 64 << 20
	images.Large(t, dir, "kill.qcow2", size, 7)
	ref := rawRef(t, dir, "kill.qcow2")
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "kill")
	m.Upload(t, "kill", "kill.qcow2", filepath.Join(dir, "kill.qcow2"))
	var endpoint string
	for _, kv := range m.Env() {
		if v, ok := strings.CutPrefix(kv, "AWS_ENDPOINT_URL="); ok {
			endpoint = strings.TrimPrefix(v, "http://")
		}
	}
	p := startProxy(t, endpoint)
	env := proxyEnv(m.Env(), p)
	target := filepath.Join(t.TempDir(), "kill.raw")
	const batch, chunk, jobs = 1 << 20, 1 << 20, 2
	args := []string{"import", "--bandwidth", "2MiB", "--flush-batch", "1MiB", "--chunk", "1MiB", "--jobs", "2", "s3://kill/kill.qcow2", target}
	rng := rand.New(rand.NewSource(time.Now().UnixNano()))
	kills := 0
	var present []int64 // KiB
	for kills < 20 {
		cmd := exec.Command(snapfsBin, args...)
		cmd.Env = append(cleanEnv(), env...)
		var errb lockedBuffer
		cmd.Stderr = &errb
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		done := make(chan error, 1)
		go func() { done <- cmd.Wait() }()
		wait := time.Duration(300+rng.Intn(1200)) * time.Millisecond
		select {
		case err := <-done:
			t.Fatalf("import ended before kill %d (after less than %v): %v\n%s", kills+1, wait, err, errb.String())
		case <-time.After(wait):
		}
		cmd.Process.Signal(syscall.SIGKILL)
		<-done
		kills++
		st, _ := volumeStatus(t, target)
		pb, _ := st["present_bytes"].(float64)
		present = append(present, int64(pb)>>10)
		if s := errb.String(); strings.Contains(s, "panic:") {
			t.Fatalf("importer crashed:\n%s", s)
		}
	}
	before := p.down.Load()
	res := runCLI(t, cliRun{args: append([]string{"import", "--flush-batch", "1MiB"}, args[len(args)-2:]...), env: env})
	if res.code != 0 {
		t.Fatalf("the final run: %s", res)
	}
	total := p.down.Load()
	if got := sha256File(t, target); got != ref.sha256 {
		t.Fatalf("after %d kills the volume's sha256 is %s, qemu-img convert %s", kills, got, ref.sha256)
	}
	var alloc int64
	for _, e := range ref.mapping {
		if e.Data {
			alloc += e.Length
		}
	}
	limit := alloc + alloc/20 + int64(kills)*(batch+jobs*chunk)
	t.Logf("kill -9 x %d at 0.3-1.5 s: KiB local after each kill %v", kills, present)
	t.Logf("allocated %d bytes; fetched %d bytes in all (%d by the killed runs, %d by the final run) = %.3f x allocated; limit %d (1.05 x allocated + %d x (batch %d + %d reads of %d in flight))",
		alloc, total, before, total-before, float64(total)/float64(alloc), limit, kills, batch, jobs, chunk)
	if total > limit {
		t.Errorf("fetched %d bytes, more than %d", total, limit)
	}
	if present[len(present)-1] == 0 {
		t.Error("no progress survived the kills: the kills did not land mid-way")
	}
}

// serveSetup makes a 32 MiB all-data image, uploads it and returns the
// image and its raw reference bytes.
func serveSetup(t *testing.T, m *harness.MinIO, name string, seed int64) (importImage, []byte) {
	t.Helper()
	dir := t.TempDir()
	images.Large(t, dir, name, 32<<20, seed)
	m.Upload(t, "imp", name, filepath.Join(dir, name))
	ref := rawRef(t, dir, name)
	raw, err := os.ReadFile(ref.raw)
	if err != nil {
		t.Fatal(err)
	}
	return importImage{url: "s3://imp/" + name, key: name, ref: ref}, raw
}

// waitComplete polls snapfs status until the volume is complete.
func waitComplete(t *testing.T, target string, d time.Duration, stderr func() string) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		st, code := volumeStatus(t, target)
		if code == 0 && st["complete"] == true {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not complete after %v: %v\n%s", target, d, st, tail(stderr(), 3000))
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestImportServe: the volume exported while it fills takes writes through
// NBD (qemu-io, with FUA, flush, trim and write-zeroes) and FUSE that
// survive hydration; once complete it is served with MinIO stopped; and
// MinIO stopped during hydration makes demand reads fail with EIO while
// hydration waits, then resumes when MinIO is back.
func TestImportServe(t *testing.T) {
	t.Parallel()
	for _, tool := range []string{"qemu-io", "nbdinfo", "nbdcopy"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not in PATH", tool)
		}
	}
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "imp")

	t.Run("nbd-writes", func(t *testing.T) {
		im, want := serveSetup(t, m, "nbdw.qcow2", 11)
		target := filepath.Join(t.TempDir(), "nbdw.raw")
		p := startServing(t, m.Env(), "import", "--serve", "nbd", "--listen", "127.0.0.1:0", "--bandwidth", "4MiB", "--chunk", "1MiB", im.url, target)
		uri := p.uri("nbdw.qcow2")
		var info []map[string]any
		if err := json.Unmarshal(mustTool(t, time.Minute, "nbdinfo", "--json", uri), &struct {
			Exports *[]map[string]any `json:"exports"`
		}{&info}); err != nil || len(info) != 1 {
			t.Fatalf("nbdinfo --json: %v %v", err, info)
		}
		for k, v := range map[string]bool{"is_read_only": false, "can_flush": true, "can_fua": true, "can_trim": true, "can_zero": true} {
			if info[0][k] != v {
				t.Errorf("nbdinfo: %s is %v, want %v", k, info[0][k], v)
			}
		}
		res := runTool(t, time.Minute, "qemu-io", "-f", "raw",
			"-c", "write -P 0xab 1000 5000", // inside a granule: copy-on-write
			"-c", "write -f -P 0xcd 20M 100k", // FUA
			"-c", "write -z 28M 64k", // WRITE_ZEROES
			"-c", "discard 12M 1M", // TRIM
			"-c", "write -P 0xee 33550000 4432", // up to the end
			"-c", "flush", uri)
		if res.code != 0 || strings.Contains(string(res.stdout), "failed") {
			t.Fatalf("qemu-io writes: %s", res)
		}
		fill := func(off, n int, b byte) {
			for i := off; i < off+n; i++ {
				want[i] = b
			}
		}
		fill(1000, 5000, 0xab)
		fill(20<<20, 100<<10, 0xcd)
		fill(28<<20, 64<<10, 0)
		fill(12<<20, 1<<20, 0)
		fill(33550000, 4432, 0xee)
		waitComplete(t, target, 2*time.Minute, p.stderr.String)
		check := func(what string) {
			out := filepath.Join(t.TempDir(), "out.raw")
			mustTool(t, time.Minute, "nbdcopy", uri, out)
			got, _ := os.ReadFile(out)
			if d := firstDiff(got, want); d != "" || len(got) != len(want) {
				t.Fatalf("%s: NBD content differs from image + writes: %s", what, d)
			}
		}
		check("after hydration")
		if got, _ := os.ReadFile(target); !bytes.Equal(got, want) {
			t.Fatalf("the target differs from image + writes: %s", firstDiff(got, want))
		}
		m.Stop()
		defer m.Start(t)
		check("complete, MinIO stopped")
		// A later serve --volume of the complete volume needs MinIO no more.
		if code := p.signal(t, syscall.SIGTERM, 15*time.Second); code != 0 {
			t.Fatalf("import --serve exits %d on SIGTERM:\n%s", code, p.stderr)
		}
		p = startServe(t, m.Env(), "--retries", "1", "--volume", target, "--listen", "127.0.0.1:0", im.url)
		uri = p.uri("nbdw.qcow2")
		check("serve --volume of the complete volume, MinIO stopped")
	})

	// serve --volume: pure copy-on-read, no background pass; read-only
	// unless --writable.
	t.Run("serve-volume", func(t *testing.T) {
		if !m.Running() {
			m.Start(t)
		}
		im, want := serveSetup(t, m, "cor.qcow2", 14)
		target := filepath.Join(t.TempDir(), "cor.raw")
		p := startServe(t, m.Env(), "--volume", target, "--listen", "127.0.0.1:0", im.url)
		uri := p.uri("cor.qcow2")
		got, res := qemuIOReads(t, uri, []qemuIORead{{off: 5 << 20, n: 4096}})
		if got[0] == nil || !bytes.Equal(got[0], want[5<<20:5<<20+4096]) {
			t.Fatalf("read through serve --volume: %s", res)
		}
		if r := runTool(t, time.Minute, "qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", uri); r.code == 0 && !strings.Contains(string(r.stdout)+r.stderr, "failed") {
			t.Fatalf("a write to a read-only --volume export worked: %s", r)
		}
		time.Sleep(2 * time.Second) // two flush intervals
		st, code := volumeStatus(t, target)
		pb, _ := st["present_bytes"].(float64)
		if code != 3 || pb < 64<<10 || pb >= 32<<20 {
			t.Fatalf("after one read, status exit %d, %v: want some bytes local and no background copy", code, st)
		}
		out := filepath.Join(t.TempDir(), "out.raw")
		mustTool(t, time.Minute, "nbdcopy", uri, out)
		if b, _ := os.ReadFile(out); !bytes.Equal(b, want) {
			t.Fatalf("serve --volume content differs: %s", firstDiff(b, want))
		}
		p.signal(t, syscall.SIGTERM, 15*time.Second)
		if b, _ := os.ReadFile(target); !bytes.Equal(b, want) {
			t.Fatal("after a full read the volume differs from the image")
		}
		if st, _ := volumeStatus(t, target); st["present_bytes"] != float64(32<<20) {
			t.Fatalf("after a full read and exit: %v", st)
		}
	})

	// mount --volume --writable: copy-on-read through FUSE, writes kept.
	t.Run("mount-volume", func(t *testing.T) {
		fuseNeed(t)
		if !m.Running() {
			m.Start(t)
		}
		im, want := serveSetup(t, m, "mvol.qcow2", 15)
		target := filepath.Join(t.TempDir(), "mvol.raw")
		mnt := t.TempDir()
		p := fuseMount(t, m.Env(), mnt, "mount", "--volume", target, "--writable", im.url, mnt)
		file := filepath.Join(mnt, "mvol.raw")
		fuseDeadline(t, time.Minute, "write and read of the mounted volume", func() {
			f, err := os.OpenFile(file, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt(bytes.Repeat([]byte{0x3c}, 3000), 7<<20+5); err != nil {
				t.Fatal(err)
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			for i := 7<<20 + 5; i < 7<<20+3005; i++ {
				want[i] = 0x3c
			}
			got := make([]byte, len(want))
			if _, err := f.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if d := firstDiff(got, want); d != "" {
				t.Fatalf("mount --volume content differs from image + write: %s", d)
			}
		})
		p.cmd.Process.Signal(syscall.SIGTERM)
		if code := p.wait(t, 20*time.Second); code != 0 {
			t.Errorf("mount --volume exits %d on SIGTERM:\n%s", code, p.stderr)
		}
		if got, _ := os.ReadFile(target); !bytes.Equal(got, want) {
			t.Fatalf("the volume differs from image + write: %s", firstDiff(got, want))
		}
		if st, code := volumeStatus(t, target); code != 3 || st["modified"] != true {
			t.Errorf("status after mount --volume: exit %d, %v (want not complete: no background pass; modified)", code, st)
		}
	})

	// A complete volume, larger than the image (--size), mounted through
	// FUSE with MinIO stopped: the file is the device (the volume's size,
	// the extra reading as zeros) and needs no listing of the bucket, both
	// with mount --volume and with import --serve fuse.
	t.Run("fuse-complete-volume", func(t *testing.T) {
		fuseNeed(t)
		if !m.Running() {
			m.Start(t)
		}
		im, want := serveSetup(t, m, "fcomp.qcow2", 16)
		const size = 40 << 20
		want = append(want, make([]byte, size-len(want))...)
		target := filepath.Join(t.TempDir(), "fcomp.raw")
		if res := runCLI(t, cliRun{args: []string{"import", "--size", "40MiB", im.url, target}, env: m.Env()}); res.code != 0 {
			t.Fatalf("import --size: %s", res)
		}
		m.Stop()
		defer m.Start(t)
		for _, args := range [][]string{
			{"mount", "--retries", "1", "--volume", target, im.url},
			{"import", "--retries", "1", "--serve", "fuse", "--mountpoint"},
		} {
			mnt := t.TempDir()
			if args[0] == "mount" {
				args = append(args, mnt)
			} else {
				args = append(args, mnt, im.url, target)
			}
			p := fuseMount(t, m.Env(), mnt, args...)
			file := filepath.Join(mnt, "fcomp.raw")
			fuseDeadline(t, time.Minute, "read of the complete volume", func() {
				fi, err := os.Stat(file)
				if err != nil {
					t.Fatalf("%s: %v", args[0], err)
				}
				if fi.Size() != size {
					t.Errorf("%s: the file is %d bytes, want the volume's %d", args[0], fi.Size(), size)
				}
				got, err := os.ReadFile(file)
				if err != nil {
					t.Fatalf("%s: %v", args[0], err)
				}
				if d := firstDiff(got, want); d != "" || len(got) != len(want) {
					t.Fatalf("%s: content of the complete volume with MinIO stopped differs: %s", args[0], d)
				}
			})
			p.cmd.Process.Signal(syscall.SIGTERM)
			if code := p.wait(t, 20*time.Second); code != 0 {
				t.Errorf("%s exits %d on SIGTERM:\n%s", args[0], code, p.stderr)
			}
		}
	})

	t.Run("minio-stopped", func(t *testing.T) {
		if !m.Running() {
			m.Start(t)
		}
		im, _ := serveSetup(t, m, "stop.qcow2", 12)
		target := filepath.Join(t.TempDir(), "stop.raw")
		p := startServing(t, m.Env(), "import", "--retries", "2", "--serve", "nbd", "--listen", "127.0.0.1:0", "--bandwidth", "4MiB", "--chunk", "1MiB", im.url, target)
		time.Sleep(time.Second)
		m.Stop()
		// The image is copied in host (here guest) order: its end is not local yet.
		got, res := qemuIOReads(t, p.uri("stop.qcow2"), []qemuIORead{{off: 32<<20 - 65536, n: 4096}})
		if got[0] != nil || !strings.Contains(string(res.stdout)+res.stderr, "Input/output error") {
			t.Fatalf("a demand read with MinIO stopped: %s", res)
		}
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(p.stderr.String(), "hydration: store unavailable, retrying") {
			if time.Now().After(deadline) {
				t.Fatalf("no retry logged:\n%s", p.stderr)
			}
			time.Sleep(100 * time.Millisecond)
		}
		if _, code := volumeStatus(t, target); code != 3 {
			t.Fatal("complete while MinIO was stopped?")
		}
		m.Start(t)
		waitComplete(t, target, 2*time.Minute, p.stderr.String)
		if got := sha256File(t, target); got != im.ref.sha256 {
			t.Fatalf("volume sha256 %s, want %s", got, im.ref.sha256)
		}
	})

	t.Run("fuse-writes", func(t *testing.T) {
		fuseNeed(t)
		if !m.Running() {
			m.Start(t)
		}
		im, want := serveSetup(t, m, "fusew.qcow2", 13)
		target := filepath.Join(t.TempDir(), "fusew.raw")
		mnt := t.TempDir()
		p := fuseMount(t, m.Env(), mnt, "import", "--serve", "fuse", "--mountpoint", mnt, "--bandwidth", "4MiB", "--chunk", "1MiB", im.url, target)
		file := filepath.Join(mnt, "fusew.raw")
		var f *os.File
		fuseDeadline(t, 30*time.Second, "open of the mounted volume", func() {
			var err error
			if f, err = os.OpenFile(file, os.O_RDWR, 0); err != nil {
				t.Fatal(err)
			}
		})
		write := func(off int64, n int, b byte) {
			if _, err := f.WriteAt(bytes.Repeat([]byte{b}, n), off); err != nil {
				t.Fatal(err)
			}
			for i := off; i < off+int64(n); i++ {
				want[i] = b
			}
		}
		write(1000, 5000, 0xab)
		write(17<<20+3, 200<<10, 0xcd)
		write(31<<20, 64<<10, 0x11)
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 25<<20, 1<<20); err != nil {
			t.Fatalf("fallocate punch hole: %v", err)
		}
		clear(want[25<<20 : 26<<20])
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		f.Close()
		waitComplete(t, target, 2*time.Minute, p.stderr.String)
		var got []byte
		fuseDeadline(t, time.Minute, "read of the mounted volume", func() { got, _ = os.ReadFile(file) })
		if d := firstDiff(got, want); d != "" || len(got) != len(want) {
			t.Fatalf("FUSE content after hydration differs from image + writes: %s", d)
		}
		if got, _ := os.ReadFile(target); !bytes.Equal(got, want) {
			t.Fatalf("the target differs from image + writes: %s", firstDiff(got, want))
		}
		p.cmd.Process.Signal(syscall.SIGTERM)
		if code := p.wait(t, 20*time.Second); code != 0 {
			t.Errorf("import --serve fuse exits %d on SIGTERM:\n%s", code, p.stderr)
		}
	})
}
