package nbd

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snapfs/snapfs/disk"
)

// Tests against real NBD clients: libnbd's nbdinfo and nbdcopy, qemu-img,
// qemu-io and fio's nbd engine. Each skips when its tool is missing.

func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if _, err := exec.LookPath(tool); err != nil {
			t.Skipf("%s not installed", tool)
		}
	}
}

// run runs a command with a timeout and returns its stdout, failing the
// test (with stderr) when it fails.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := tryRun(t, name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func tryRun(t *testing.T, name string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = t.TempDir() // fio leaves verify state files in its directory
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

// fixture is a server with a read-only export "disk" and a writable "rw".
type fixture struct {
	ro, rw *fakeDevice
	srv    *Server
	addr   string // host:port
	sock   string // unix socket
}

func newFixture(t *testing.T) *fixture {
	f := &fixture{ro: roDevice(testSize, 21), rw: newFakeDevice(testSize, 22)}
	f.srv = newServer(t, f.ro, Export{Name: "rw", Description: "writable", Device: f.rw})
	f.addr = serve(t, f.srv)
	f.sock = serveUnix(t, f.srv)
	return f
}

func (f *fixture) uri(name string) string { return "nbd://" + f.addr + "/" + name }

func writeFile(t *testing.T, name string, data []byte) string {
	p := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestNbdinfo(t *testing.T) {
	t.Parallel()
	need(t, "nbdinfo")
	f := newFixture(t)

	type export struct {
		Name       string   `json:"export-name"`
		Desc       string   `json:"description"`
		Size       int64    `json:"export-size"`
		ReadOnly   bool     `json:"is_read_only"`
		MultiConn  bool     `json:"can_multi_conn"`
		CanTrim    bool     `json:"can_trim"`
		CanZero    bool     `json:"can_zero"`
		CanFUA     bool     `json:"can_fua"`
		CanCache   bool     `json:"can_cache"`
		CanDF      bool     `json:"can_df"`
		Contexts   []string `json:"contexts"`
		MaxBlock   int64    `json:"block_size_maximum"`
		Structured bool
	}
	type info struct {
		Protocol   string   `json:"protocol"`
		TLS        bool     `json:"TLS"`
		Structured bool     `json:"structured"`
		Exports    []export `json:"exports"`
	}
	parse := func(out string) info {
		var i info
		if err := json.Unmarshal([]byte(out), &i); err != nil {
			t.Fatalf("nbdinfo JSON: %v\n%s", err, out)
		}
		return i
	}

	// The empty name is the default export when there is only one.
	one := serve(t, newServer(t, f.ro))
	for _, uri := range []string{f.uri("disk"), "nbd://" + one, "nbd+unix:///disk?socket=" + f.sock} {
		i := parse(run(t, "nbdinfo", "--json", uri))
		if i.Protocol != "newstyle-fixed" || !i.Structured || len(i.Exports) != 1 {
			t.Fatalf("%s: %+v", uri, i)
		}
		e := i.Exports[0]
		if e.Name != "disk" || e.Size != testSize || !e.ReadOnly || !e.MultiConn || e.CanTrim || !e.CanCache || !e.CanDF ||
			fmt.Sprint(e.Contexts) != "[base:allocation]" || e.MaxBlock != defaultMaxRequest || e.Desc != "a fake disk" {
			t.Errorf("%s: %+v", uri, e)
		}
	}
	e := parse(run(t, "nbdinfo", "--json", f.uri("rw"))).Exports[0]
	if e.ReadOnly || !e.CanTrim || !e.CanZero || !e.CanFUA || !e.MultiConn {
		t.Errorf("rw: %+v", e)
	}
	if out := run(t, "nbdinfo", "--size", f.uri("rw")); strings.TrimSpace(out) != fmt.Sprint(testSize) {
		t.Errorf("--size: %q", out)
	}
	if _, err := tryRun(t, "nbdinfo", "--is", "read-only", f.uri("disk")); err != nil {
		t.Errorf("--is read-only disk: %v", err)
	}
	if _, err := tryRun(t, "nbdinfo", "--is", "read-only", f.uri("rw")); err == nil {
		t.Errorf("--is read-only rw: succeeded")
	}
	for _, uri := range []string{f.uri("nope"), "nbd://" + f.addr} { // unknown, ambiguous
		if out, err := tryRun(t, "nbdinfo", uri); err == nil {
			t.Errorf("nbdinfo %s: succeeded: %s", uri, out)
		}
	}

	// --list.
	l := parse(run(t, "nbdinfo", "--list", "--json", "nbd://"+f.addr))
	var names []string
	for _, e := range l.Exports {
		names = append(names, e.Name+"="+fmt.Sprint(e.Size))
	}
	if fmt.Sprint(names) != fmt.Sprintf("[disk=%d rw=%d]", testSize, testSize) {
		t.Errorf("--list: %v", names)
	}

	// --map agrees with the device's extents.
	type ext struct {
		Off  int64 `json:"offset"`
		Len  int64 `json:"length"`
		Type int   `json:"type"`
	}
	var m []ext
	if err := json.Unmarshal([]byte(run(t, "nbdinfo", "--map", "--json", f.uri("disk"))), &m); err != nil {
		t.Fatal(err)
	}
	var want []ext
	for _, x := range f.ro.allExtents() {
		ty := 0
		if x.Hole {
			ty |= stateHole
		}
		if x.Zero {
			ty |= stateZero
		}
		want = append(want, ext{x.Offset, x.Length, ty})
	}
	if fmt.Sprint(m) != fmt.Sprint(want) {
		t.Errorf("--map:\n got %v\nwant %v", m, want)
	}
}

func TestNbdcopy(t *testing.T) {
	t.Parallel()
	need(t, "nbdcopy")
	f := newFixture(t)
	want := f.ro.snapshot()
	dir := t.TempDir()

	// Whole export, 4 connections (the default with multi-conn).
	out := filepath.Join(dir, "out.raw")
	run(t, "nbdcopy", "--connections=4", f.uri("disk"), out)
	if got, _ := os.ReadFile(out); !bytes.Equal(got, want) {
		t.Fatal("nbdcopy: copy differs")
	}
	// Into a sparse file: holes stay holes.
	sparse := filepath.Join(dir, "sparse.raw")
	if err := os.WriteFile(sparse, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(sparse, testSize); err != nil {
		t.Fatal(err)
	}
	run(t, "nbdcopy", "--destination-is-zero", f.uri("disk"), sparse)
	if got, _ := os.ReadFile(sparse); !bytes.Equal(got, want) {
		t.Fatal("nbdcopy sparse: copy differs")
	}
	checkSparse(t, sparse, f.ro.allExtents())

	// Into the writable export (writes and zeroes over 4 connections), and
	// back out through the Unix socket.
	src := writeFile(t, "src.raw", want)
	run(t, "nbdcopy", src, f.uri("rw"))
	if !bytes.Equal(f.rw.snapshot(), want) {
		t.Fatal("nbdcopy to rw: device content differs")
	}
	back := filepath.Join(dir, "back.raw")
	run(t, "nbdcopy", "nbd+unix:///rw?socket="+f.sock, back)
	if got, _ := os.ReadFile(back); !bytes.Equal(got, want) {
		t.Fatal("nbdcopy from rw: copy differs")
	}
}

// checkSparse checks that the hole extents of exts are holes in the file
// (SEEK_DATA skips them), as far as the file system keeps holes at all.
func checkSparse(t *testing.T, path string, exts []disk.Extent) {
	t.Helper()
	fd, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer fd.Close()
	var st syscall.Stat_t
	if err := syscall.Fstat(int(fd.Fd()), &st); err != nil {
		t.Fatal(err)
	}
	var data int64
	for _, e := range exts {
		if !e.Hole {
			data += e.Length
		}
	}
	allocated := st.Blocks * 512
	// Allow one file-system block of slack per data extent boundary.
	if allocated > data+int64(len(exts))*int64(st.Blksize) {
		t.Errorf("%s: %d bytes allocated for %d bytes of data: holes were written", path, allocated, data)
	}
	const seekData = 3
	for _, e := range exts {
		if !e.Hole || e.Length < 2*int64(st.Blksize) {
			continue
		}
		// The block-aligned interior of a hole must hold no data.
		lo := (e.Offset + int64(st.Blksize) - 1) / int64(st.Blksize) * int64(st.Blksize)
		next, err := syscall.Seek(int(fd.Fd()), lo, seekData)
		if err == nil && next < e.Offset+e.Length-int64(st.Blksize) {
			t.Errorf("%s: data at %d inside hole [%d,+%d)", path, next, e.Offset, e.Length)
			return
		}
	}
}

func TestQemuImg(t *testing.T) {
	t.Parallel()
	need(t, "qemu-img")
	f := newFixture(t)
	raw := writeFile(t, "disk.raw", f.ro.snapshot())
	out := run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw, f.uri("disk"))
	if !strings.Contains(out, "identical") {
		t.Errorf("qemu-img compare: %s", out)
	}
	// A differing byte is found.
	other := f.ro.snapshot()
	other[testSize/2] ^= 1
	raw2 := writeFile(t, "other.raw", other)
	if out, err := tryRun(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", raw2, f.uri("disk")); err == nil {
		t.Errorf("qemu-img compare of differing images succeeded: %s", out)
	}
	// qemu-img convert reads it all (structured replies, block status).
	conv := filepath.Join(t.TempDir(), "conv.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", f.uri("disk"), conv)
	got, _ := os.ReadFile(conv)
	if !bytes.Equal(got[:testSize], f.ro.snapshot()) {
		t.Error("qemu-img convert: content differs")
	}
	// qemu-img map sees the holes.
	var m []struct {
		Start, Length int64
		Data, Zero    bool
	}
	if err := json.Unmarshal([]byte(run(t, "qemu-img", "map", "--output=json", "-f", "raw", f.uri("disk"))), &m); err != nil {
		t.Fatal(err)
	}
	var holes, wantHoles int64
	for _, e := range m {
		// qemu rounds the size up to 512 bytes; the tail reads as a hole.
		if !e.Data && e.Zero && e.Start < testSize {
			holes += min(e.Length, testSize-e.Start)
		}
	}
	for _, e := range f.ro.allExtents() {
		if e.Hole {
			wantHoles += e.Length
		}
	}
	if holes != wantHoles {
		t.Errorf("qemu-img map: %d bytes of holes, device has %d", holes, wantHoles)
	}
}

func TestQemuIo(t *testing.T) {
	t.Parallel()
	need(t, "qemu-io")
	f := newFixture(t)
	want := f.ro.snapshot()

	// Pattern blocks (i%11 == 5 unless a hole) and holes, at odd offsets
	// and lengths.
	var cmds []string
	for _, i := range []int{5, 16, 27, 49, 60, 71, 82} {
		lo := int64(i) * fakeBlock
		if want[lo] != patternByte(i) {
			t.Fatalf("block %d is not a pattern block", i)
		}
		cmds = append(cmds, "-c", fmt.Sprintf("read -P %#x %d %d", patternByte(i), lo+int64(i), fakeBlock-2*i-1))
	}
	for _, e := range f.ro.allExtents() {
		if e.Hole && e.Length > 100 {
			cmds = append(cmds, "-c", fmt.Sprintf("read -P 0 %d %d", e.Offset+33, e.Length-67))
		}
		if len(cmds) > 40 {
			break
		}
	}
	args := append([]string{"-f", "raw", "-r"}, cmds...)
	out := run(t, "qemu-io", append(args, f.uri("disk"))...)
	if strings.Contains(out, "fail") || strings.Count(out, "read ") != len(cmds)/2 {
		t.Errorf("qemu-io reads:\n%s", out)
	}
	// A wrong pattern is caught (the check above is not vacuous).
	if out, err := tryRun(t, "qemu-io", "-f", "raw", "-r", "-c", "read -P 0x41 20480 100", f.uri("disk")); err == nil && !strings.Contains(out, "fail") {
		t.Errorf("wrong pattern not detected: %s", out)
	}
	// read -v dumps bytes: compare an unaligned range of random data.
	const off, n = 1<<20 + 4097, 333
	dump := run(t, "qemu-io", "-f", "raw", "-r", "-c", fmt.Sprintf("read -v %d %d", off, n), f.uri("disk"))
	if got := parseHexdump(t, dump, off, n); !bytes.Equal(got, want[off:off+n]) {
		t.Errorf("read -v: bytes differ\n%s", dump)
	}
}

// parseHexdump reads qemu-io's "read -v" output ("%08x:  xx xx ...  ascii").
func parseHexdump(t *testing.T, dump string, off, n int64) []byte {
	var out []byte
	for _, line := range strings.Split(dump, "\n") {
		addr, rest, ok := strings.Cut(line, ":  ")
		if !ok || len(addr) != 8 {
			continue
		}
		var a int64
		if _, err := fmt.Sscanf(addr, "%x", &a); err != nil || a != off+int64(len(out)) {
			continue
		}
		for _, f := range strings.Fields(rest) {
			if len(f) != 2 {
				break
			}
			var b byte
			if _, err := fmt.Sscanf(f, "%02x", &b); err != nil {
				break
			}
			out = append(out, b)
			if int64(len(out)) == n {
				return out
			}
		}
	}
	return out
}

func TestQemuIoWritable(t *testing.T) {
	t.Parallel()
	need(t, "qemu-io")
	f := newFixture(t)
	want := f.rw.snapshot()
	out := run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x55 1000 5000",
		"-c", "read -P 0x55 1000 5000",
		"-c", "write -f -P 0x66 8192 4096", // FUA
		"-c", "flush",
		"-c", "write -z 65536 131072", // WRITE_ZEROES, NO_HOLE
		"-c", "write -z -u 393216 65536", // WRITE_ZEROES, may punch
		"-c", "discard 262144 65536", // TRIM
		"-c", "read -P 0 65536 131072",
		"-c", "read -P 0x66 8192 4096",
		f.uri("rw"))
	if strings.Contains(out, "fail") {
		t.Fatalf("qemu-io:\n%s", out)
	}
	for i := 1000; i < 6000; i++ {
		want[i] = 0x55
	}
	for i := 8192; i < 8192+4096; i++ {
		want[i] = 0x66
	}
	clear(want[65536 : 65536+131072])
	clear(want[393216 : 393216+65536])
	clear(want[262144 : 262144+65536])
	if !bytes.Equal(f.rw.snapshot(), want) {
		t.Error("device content differs after qemu-io writes")
	}
	if f.rw.flushes.Load() < 2 || f.rw.zeroes.Load() < 2 || f.rw.trims.Load() < 1 {
		t.Errorf("flushes %d, write-zeroes %d, trims %d", f.rw.flushes.Load(), f.rw.zeroes.Load(), f.rw.trims.Load())
	}
}

// fioRun runs fio with JSON output and returns its first job.
func fioRun(t *testing.T, args ...string) map[string]any {
	t.Helper()
	out := run(t, "fio", append(args, "--output-format=json")...)
	// The nbd engine prints a line before the JSON.
	if i := strings.Index(out, "{"); i > 0 {
		out = out[i:]
	}
	var res struct {
		Jobs []map[string]any `json:"jobs"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Jobs) != 1 {
		t.Fatalf("fio output: %v\n%s", err, out)
	}
	return res.Jobs[0]
}

func fioBytes(job map[string]any, dir string) float64 {
	d, _ := job[dir].(map[string]any)
	n, _ := d["io_bytes"].(float64)
	return n
}

func TestFio(t *testing.T) {
	t.Parallel()
	need(t, "fio")
	if out, _ := tryRun(t, "fio", "--enghelp=nbd"); !strings.Contains(out, "uri") {
		t.Skip("fio has no nbd engine")
	}
	f := newFixture(t)
	var wg sync.WaitGroup
	wg.Go(func() {
		job := fioRun(t, "--name=randread", "--ioengine=nbd", "--uri="+f.uri("disk"),
			"--rw=randread", "--bs=4k", "--iodepth=32", "--size=4M", "--runtime=5", "--time_based")
		if e, _ := job["error"].(float64); e != 0 || fioBytes(job, "read") == 0 {
			t.Errorf("fio randread: error %v, read %v bytes", job["error"], fioBytes(job, "read"))
		}
	})
	wg.Go(func() {
		// Random writes at depth 32, then read back and checked by fio.
		job := fioRun(t, "--name=verify", "--ioengine=nbd", "--uri="+f.uri("rw"),
			"--rw=randwrite", "--bs=4k", "--bsrange=512-64k", "--iodepth=32", "--size=4M",
			"--verify=crc32c", "--do_verify=1", "--verify_state_save=0")
		if e, _ := job["error"].(float64); e != 0 || fioBytes(job, "write") == 0 || fioBytes(job, "read") == 0 {
			t.Errorf("fio verify: error %v, wrote %v, read %v", job["error"], fioBytes(job, "write"), fioBytes(job, "read"))
		}
	})
	wg.Wait()
}
