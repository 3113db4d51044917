package e2e

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/snapfs/snapfs/tests/harness"
	"github.com/snapfs/snapfs/tests/images"
)

// serveImages are the corpus images `snapfs serve` exports from MinIO, with
// the sub-prefix of vm/ each goes to: plain v3, zlib and zstd compression, a
// 3-level backing chain, extended L2 (alone and over a backing file), zero
// clusters (with a stale host offset), an external data file, and a size
// that is no multiple of the cluster size.
var serveImages = map[string]string{
	"v3-64k": "", "zlib-64k": "", "zstd-64k": "", "chain": "", "extl2": "",
	"extl2-backed": "", "zero": "sub/dir/", "datafile": "", "odd-size": "",
}

// serveFio are the exports fio reads (the others are backing files).
var serveFio = map[string]bool{
	"v3-64k.qcow2": true, "zlib-64k.qcow2": true, "zstd-64k.qcow2": true, "chain-top.qcow2": true,
	"extl2.qcow2": true, "extl2-top.qcow2": true, "sub/dir/zero.qcow2": true, "datafile.qcow2": true, "odd-size.qcow2": true,
}

// TestServe exports corpus images from a real MinIO with `snapfs serve` and
// reads them with real NBD clients: nbdinfo, nbdcopy, qemu-img, qemu-io and
// fio (libnbd and QEMU, with structured replies), and a client of the
// test's own that never asks for structured replies. Three servers: one
// for a prefix (every image under it), one for a single image (the empty
// export name selects it), one on a unix socket with NAME=URL arguments.
func TestServe(t *testing.T) {
	t.Parallel()
	dir, corpus, _ := imageSet(t)
	m := harness.StartMinIO(t)
	const bucket = "nbd"
	m.MakeBucket(t, bucket)
	base := "s3://" + bucket + "/vm/"

	// exports maps each export name of the prefix server to the local
	// file it must read as.
	exports := map[string]string{}
	for name, sub := range serveImages {
		im := byName(t, corpus, name)
		for _, f := range im.Files {
			m.Upload(t, bucket, "vm/"+sub+f, filepath.Join(dir, f))
			if strings.HasSuffix(f, ".qcow2") {
				exports[sub+f] = f
			}
		}
	}
	// To be left out, with a log line each: an object that is not QCOW2,
	// and an encrypted image (the data file above is not QCOW2 either).
	notes := filepath.Join(t.TempDir(), "notes.txt")
	if err := os.WriteFile(notes, []byte("not a disk image\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	m.Upload(t, bucket, "vm/sub/notes.txt", notes)
	luks := byName(t, corpus, "luks")
	m.Upload(t, bucket, "vm/sub/luks.qcow2", filepath.Join(dir, luks.Key))
	env := m.Env()

	// The references, made meanwhile by qemu-img.
	var wg sync.WaitGroup
	for _, f := range exports {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := rawRefErr(t, dir, f); err != nil {
				t.Error(err)
			}
		}()
	}
	all := startServe(t, env, "--log-level", "info", "--listen", "127.0.0.1:0", base)
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	ref := func(t *testing.T, export string) *serveRef {
		f, ok := exports[export]
		if !ok {
			t.Fatalf("no export %q", export)
		}
		return rawRef(t, dir, f)
	}

	// nbdinfo --list names every image, and nothing else; the objects
	// left out are logged by name.
	t.Run("list", func(t *testing.T) {
		t.Parallel()
		want := slices.Sorted(mapKeys(exports))
		if got := slices.Sorted(slices.Values(all.exports)); !slices.Equal(got, want) {
			t.Errorf("serving line names %q, want %q", got, want)
		}
		out := mustTool(t, time.Minute, "nbdinfo", "--list", "--json", all.uri(""))
		var list struct {
			Protocol   string `json:"protocol"`
			Structured bool   `json:"structured"`
			Exports    []struct {
				Name     string `json:"export-name"`
				Size     int64  `json:"export-size"`
				ReadOnly bool   `json:"is_read_only"`
				Multi    bool   `json:"can_multi_conn"`
			} `json:"exports"`
		}
		if err := json.Unmarshal(out, &list); err != nil {
			t.Fatalf("nbdinfo --list --json: %v\n%s", err, out)
		}
		if list.Protocol != "newstyle-fixed" || !list.Structured {
			t.Errorf("nbdinfo: protocol %q, structured %v; want newstyle-fixed with structured replies", list.Protocol, list.Structured)
		}
		var got []string
		for _, e := range list.Exports {
			got = append(got, e.Name)
			if _, ok := exports[e.Name]; !ok {
				continue
			}
			if r := ref(t, e.Name); e.Size != r.size {
				t.Errorf("nbdinfo --list: %s is %d bytes, qemu-img says %d", e.Name, e.Size, r.size)
			}
			if !e.ReadOnly || !e.Multi {
				t.Errorf("nbdinfo --list: %s read-only %v, multi-conn %v; want both", e.Name, e.ReadOnly, e.Multi)
			}
		}
		slices.Sort(got)
		if !slices.Equal(got, want) {
			t.Errorf("nbdinfo --list lists %q, want %q", got, want)
		}
		logs := all.stderr.String()
		for _, c := range []struct{ object, what string }{
			{"vm/sub/notes.txt", "not a QCOW2 image"},
			{"vm/datafile.data", "not a QCOW2 image"},
			{"vm/sub/luks.qcow2", "encrypt"},
		} {
			if !logLine(logs, c.object, "left out", c.what) {
				t.Errorf("no log line says %s was left out (%s):\n%s", c.object, c.what, logs)
			}
		}
	})

	// Each export, read with every client.
	for _, name := range slices.Sorted(mapKeys(exports)) {
		t.Run("export/"+name, func(t *testing.T) {
			t.Parallel()
			checkExport(t, all.uri(name), ref(t, name), serveFio[name])
		})
	}

	// Clients without structured replies (the test's own, negotiating
	// with NBD_OPT_GO or NBD_OPT_EXPORT_NAME), eight at once over
	// several exports, each with 16 requests in flight.
	t.Run("simple-replies", func(t *testing.T) {
		t.Parallel()
		names := slices.Sorted(mapKeys(exports))
		var wg sync.WaitGroup
		for i := range 8 {
			name := names[(i*5)%len(names)]
			hello := nbdHello(i % 2)
			r := ref(t, name)
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := nbdDial("tcp", all.addr, name, hello, time.Now().Add(time.Minute))
				if err != nil {
					t.Errorf("client %d (%v, %s): %v", i, hello, name, err)
					return
				}
				defer c.close()
				checkClient(t, fmt.Sprintf("client %d (%v, %s)", i, hello, name), c, r, uint64(i)+1)
			}()
		}
		wg.Wait()

		// The largest request the server advertises, at an odd offset.
		r := ref(t, "v3-64k.qcow2")
		c, err := nbdDial("tcp", all.addr, "v3-64k.qcow2", helloGo, time.Now().Add(time.Minute))
		if err != nil {
			t.Fatal(err)
		}
		defer c.close()
		b, errno, err := c.read(12345, 32<<20)
		if err != nil || errno != 0 {
			t.Fatalf("32 MiB read: error %d, %v", errno, err)
		}
		if d := firstDiff(b, r.bytes(t, 12345, 32<<20)); d != "" {
			t.Errorf("32 MiB read at 12345: %s", d)
		}
	})

	// Eight nbdcopy at once, with 4 connections each, over four
	// exports.
	t.Run("many-copies", func(t *testing.T) {
		t.Parallel()
		names := []string{"chain-top.qcow2", "sub/dir/zero.qcow2", "datafile.qcow2", "extl2-top.qcow2"}
		var wg sync.WaitGroup
		outs := make([]string, 8)
		results := make([]*toolResult, 8)
		for i := range 8 {
			outs[i] = filepath.Join(t.TempDir(), "copy.raw")
			wg.Add(1)
			go func() {
				defer wg.Done()
				results[i] = runTool(t, 2*time.Minute, "nbdcopy", "--connections=4", "--requests=16", all.uri(names[i%len(names)]), outs[i])
			}()
		}
		wg.Wait()
		for i, res := range results {
			name := names[i%len(names)]
			if res.code != 0 {
				t.Errorf("%s", res)
			} else if sum, want := sha256File(t, outs[i]), ref(t, name).sha256; sum != want {
				t.Errorf("nbdcopy %d of %s: sha256 %s, want %s", i, name, sum, want)
			}
		}
	})

	// An unknown export name is refused, and so is the empty name when
	// there are several exports; the server serves on.
	t.Run("unknown", func(t *testing.T) {
		t.Parallel()
		for _, name := range []string{"no-such.qcow2", "", "sub/", "zero.qcow2", "datafile.data", "sub/luks.qcow2", "sub/notes.txt"} {
			res := runTool(t, time.Minute, "nbdinfo", "--size", all.uri(name))
			if res.code == 0 {
				t.Errorf("nbdinfo --size %s succeeded (%s), want a refusal", all.uri(name), bytes.TrimSpace(res.stdout))
			}
			_, err := nbdDial("tcp", all.addr, name, helloGo, time.Now().Add(time.Minute))
			var oe *nbdOptError
			if !errors.As(err, &oe) || oe.typ != nbdcRepErrUnknwn {
				t.Errorf("NBD_OPT_GO %q: %v; want NBD_REP_ERR_UNKNOWN", name, err)
			}
			if _, err := nbdDial("tcp", all.addr, name, helloExportName, time.Now().Add(time.Minute)); err == nil {
				t.Errorf("NBD_OPT_EXPORT_NAME %q: accepted", name)
			}
		}
		if !all.running() {
			t.Fatalf("the server exited:\n%s", all.stderr)
		}
		if out := mustTool(t, time.Minute, "nbdinfo", "--size", all.uri("v3-64k.qcow2")); strings.TrimSpace(string(out)) != fmt.Sprint(ref(t, "v3-64k.qcow2").size) {
			t.Errorf("after the refusals, nbdinfo --size says %s", out)
		}
	})

	// One image: the empty export name selects it. With a small cache,
	// small fetches and few of them at once.
	t.Run("single", func(t *testing.T) {
		t.Parallel()
		p := startServe(t, env, "--listen", "127.0.0.1:0", "--cache-size", "4MiB", "--min-get", "64KiB", "--max-inflight", "2", base+"chain-top.qcow2")
		r := ref(t, "chain-top.qcow2")
		if !slices.Equal(p.exports, []string{"chain-top.qcow2"}) {
			t.Errorf("serving %q, want [chain-top.qcow2]", p.exports)
		}
		noName := "nbd://" + p.addr
		if out := mustTool(t, time.Minute, "nbdinfo", "--size", noName); strings.TrimSpace(string(out)) != fmt.Sprint(r.size) {
			t.Errorf("nbdinfo --size %s: %s, want %d", noName, out, r.size)
		}
		out := mustTool(t, time.Minute, "nbdinfo", "--list", "--json", noName)
		var list struct {
			Exports []struct {
				Name string `json:"export-name"`
			} `json:"exports"`
		}
		if err := json.Unmarshal(out, &list); err != nil || len(list.Exports) != 1 || list.Exports[0].Name != "chain-top.qcow2" {
			t.Errorf("nbdinfo --list: %v\n%s", err, out)
		}
		checkCopy(t, noName, r)
		checkCompare(t, noName, r)
		for _, hello := range []nbdHello{helloGo, helloExportName} {
			c, err := nbdDial("tcp", p.addr, "", hello, time.Now().Add(time.Minute))
			if err != nil {
				t.Errorf("%v with the empty name: %v", hello, err)
				continue
			}
			checkClient(t, hello.String()+" with the empty name", c, r, 99)
			c.close()
		}
	})

	// NAME=URL (an image, and a prefix: NAME/path) on a unix socket
	// only; the encrypted image under the prefix is left out with a
	// warning at the default log level.
	t.Run("named-socket", func(t *testing.T) {
		t.Parallel()
		sockDir, err := os.MkdirTemp("", "snapfs-nbd-")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.RemoveAll(sockDir) })
		sock := filepath.Join(sockDir, "nbd.sock")
		p := startServe(t, env, "--socket", sock, "top="+base+"chain-top.qcow2", "vm="+base+"sub/", "plain="+base+"v3-64k.qcow2")
		want := []string{"plain", "top", "vm/dir/zero.qcow2"}
		if got := slices.Sorted(slices.Values(p.exports)); !slices.Equal(got, want) {
			t.Errorf("serving %q, want %q", got, want)
		}
		logs := p.stderr.String()
		if p.socket != sock || strings.Contains(logs, "(tcp)") {
			t.Errorf("want one listener, on unix socket %s:\n%s", sock, logs)
		}
		if !logLine(logs, "sub/luks.qcow2", "left out", "encrypt") {
			t.Errorf("no warning names sub/luks.qcow2 as left out:\n%s", logs)
		}
		uri := func(name string) string { return "nbd+unix:///" + name + "?socket=" + sock }
		out := mustTool(t, time.Minute, "nbdinfo", "--list", "--json", uri(""))
		var list struct {
			Exports []struct {
				Name string `json:"export-name"`
			} `json:"exports"`
		}
		if err := json.Unmarshal(out, &list); err != nil {
			t.Fatalf("nbdinfo --list: %v\n%s", err, out)
		}
		var got []string
		for _, e := range list.Exports {
			got = append(got, e.Name)
		}
		if slices.Sort(got); !slices.Equal(got, want) {
			t.Errorf("nbdinfo --list lists %q, want %q", got, want)
		}
		checkCopy(t, uri("top"), ref(t, "chain-top.qcow2"))
		checkCompare(t, uri("vm/dir/zero.qcow2"), ref(t, "sub/dir/zero.qcow2"))
		c, err := nbdDial("unix", sock, "plain", helloGo, time.Now().Add(time.Minute))
		if err != nil {
			t.Fatalf("client over the socket: %v", err)
		}
		checkClient(t, "client over the socket", c, ref(t, "v3-64k.qcow2"), 7)
		c.close()
		for _, name := range []string{"", "chain-top.qcow2", "v3-64k.qcow2", "top/"} {
			if res := runTool(t, time.Minute, "nbdinfo", "--size", uri(name)); res.code == 0 {
				t.Errorf("nbdinfo --size %s succeeded, want a refusal", uri(name))
			}
		}
		// SIGTERM: exit 0, the socket file removed.
		if code := p.signal(t, syscall.SIGTERM, 15*time.Second); code != 0 {
			t.Errorf("exit %d on SIGTERM, want 0:\n%s", code, p.stderr)
		}
		if _, err := os.Lstat(sock); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("the socket %s is still there after the server exited (%v)", sock, err)
		}
	})

	// A pre-signed URL: the export is named by the key's base name, and
	// the signature shows neither to NBD clients (the description) nor
	// in the log; NAME=URL still works with the URL's own '='.
	t.Run("presigned", func(t *testing.T) {
		t.Parallel()
		u := m.PresignGet(t, bucket, "vm/zstd-64k.qcow2", time.Hour)
		sig := signature(t, u)
		r := ref(t, "zstd-64k.qcow2")
		for _, c := range []struct{ arg, name string }{{u, "zstd-64k.qcow2"}, {"z=" + u, "z"}} {
			p := startServe(t, nil, "--log-level", "debug", "--listen", "127.0.0.1:0", c.arg)
			if !slices.Equal(p.exports, []string{c.name}) {
				t.Errorf("serve %.40s...: exports %q, want [%s]", c.arg, p.exports, c.name)
			}
			res := runTool(t, time.Minute, "nbdinfo", "--list", "--json", p.uri(""))
			if res.code != 0 {
				t.Fatalf("%s", res)
			}
			if strings.Contains(string(res.stdout), sig) || strings.Contains(string(res.stdout), "X-Amz-") {
				t.Errorf("nbdinfo --list shows the signature:\n%s", res.stdout)
			}
			if !strings.Contains(string(res.stdout), "zstd-64k.qcow2") {
				t.Errorf("nbdinfo --list: the description does not name the object:\n%s", res.stdout)
			}
			checkCopy(t, p.uri(c.name), r)
			if logs := p.stderr.String(); strings.Contains(logs, sig) || strings.Contains(logs, m.SecretKey) {
				t.Errorf("serve's log shows the signature:\n%s", tail(logs, 3000))
			}
		}
	})

	// Keys with spaces, '#', '%', '+' and non-ASCII letters are exported
	// under those names, which clients give URI-escaped.
	t.Run("odd-names", func(t *testing.T) {
		t.Parallel()
		keys := []string{"my disk #1.qcow2", "ü/100%.qcow2", "a+b.qcow2"}
		for _, k := range keys {
			m.Upload(t, bucket, "names/"+k, filepath.Join(dir, "extl2.qcow2"))
		}
		p := startServe(t, env, "--listen", "127.0.0.1:0", "s3://"+bucket+"/names/")
		if got, want := slices.Sorted(slices.Values(p.exports)), slices.Sorted(slices.Values(keys)); !slices.Equal(got, want) {
			t.Errorf("exports %q, want %q", got, want)
		}
		r := ref(t, "extl2.qcow2")
		for _, k := range keys {
			var esc []string
			for _, seg := range strings.Split(k, "/") {
				esc = append(esc, url.PathEscape(seg))
			}
			hw := newHashWriter()
			res := runToolOut(t, time.Minute, hw, "nbdcopy", p.uri(strings.Join(esc, "/")), "-")
			if res.code != 0 || hw.sum() != r.sha256 {
				t.Errorf("nbdcopy of %q: sha256 %s, want %s\n%s", k, hw.sum(), r.sha256, res)
			}
			c, err := nbdDial("tcp", p.addr, k, helloGo, time.Now().Add(time.Minute))
			if err != nil {
				t.Errorf("NBD_OPT_GO %q: %v", k, err)
				continue
			}
			checkClient(t, k, c, r, 11)
			c.close()
		}
	})

	// Arguments that leave nothing to serve, or cannot be served, make
	// serve exit non-zero at once, saying why.
	t.Run("errors", func(t *testing.T) {
		t.Parallel()
		m.Upload(t, bucket, "other/notes.txt", notes)
		m.Upload(t, bucket, "dup/v3-64k.qcow2", filepath.Join(dir, "v3-64k.qcow2"))
		busy, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer busy.Close()
		for _, c := range []struct {
			args []string
			says []string
		}{
			{[]string{}, []string{"URL"}},
			{[]string{"a=" + base + "v3-64k.qcow2", "a=" + base + "zlib-64k.qcow2"}, []string{`"a"`}},
			{[]string{base + "v3-64k.qcow2", "s3://" + bucket + "/dup/v3-64k.qcow2"}, []string{`"v3-64k.qcow2"`}},
			{[]string{base, base + "v3-64k.qcow2"}, []string{`"v3-64k.qcow2"`}},
			{[]string{"s3://" + bucket + "/other/"}, []string{"no image"}},
			{[]string{base + "no-such.qcow2"}, []string{"no-such.qcow2", "not found"}},
			{[]string{base + "sub/luks.qcow2"}, []string{"sub/luks.qcow2", "encrypt"}},
			{[]string{base + "sub/notes.txt"}, []string{"sub/notes.txt"}},
			{[]string{"--listen", busy.Addr().String(), base + "v3-64k.qcow2"}, []string{busy.Addr().String()}},
			{[]string{"--tls", "require", base + "v3-64k.qcow2"}, []string{"--tls-cert"}},
		} {
			args := []string{"serve", "--retries", "2"}
			if !slices.Contains(c.args, "--listen") {
				// Not the default port, should it serve after all.
				args = append(args, "--listen", "127.0.0.1:0")
			}
			args = append(args, c.args...)
			res := runCLI(t, cliRun{args: args, env: env, timeout: 30 * time.Second})
			if res.code == 0 || res.code == -1 {
				t.Errorf("exit %d, want an error:\n%s", res.code, res)
				continue
			}
			for _, w := range c.says {
				if !strings.Contains(strings.ToLower(res.stderr), strings.ToLower(w)) {
					t.Errorf("the error does not say %q:\n%s", w, res)
				}
			}
		}
	})
}

// logLine reports whether one line of logs holds all of words.
func logLine(logs string, words ...string) bool {
	for _, line := range strings.Split(logs, "\n") {
		ok := true
		for _, w := range words {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			return true
		}
	}
	return false
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}

// checkExport reads one export with every client and compares with r.
func checkExport(t *testing.T, uri string, r *serveRef, fio bool) {
	t.Helper()
	if out := mustTool(t, time.Minute, "nbdinfo", "--size", uri); strings.TrimSpace(string(out)) != fmt.Sprint(r.size) {
		t.Errorf("nbdinfo --size: %s, qemu-img says %d", bytes.TrimSpace(out), r.size)
	}
	checkNBDMap(t, uri, r)
	checkCopy(t, uri, r)
	checkCompare(t, uri, r)
	checkQemuIO(t, uri, r)
	if fio {
		checkFio(t, uri)
	}
}

// checkNBDMap compares nbdinfo --map (base:allocation) with qemu-img map:
// what qemu-img calls data must not be flagged zero, and what it says
// reads as zero must be.
func checkNBDMap(t *testing.T, uri string, r *serveRef) {
	t.Helper()
	out := mustTool(t, time.Minute, "nbdinfo", "--map", "--json", uri)
	var m []nbdinfoMap
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatalf("nbdinfo --map --json: %v\n%s", err, tail(string(out), 2000))
	}
	var s []segment
	for _, e := range m {
		c := isData
		if e.Type&2 != 0 { // NBD_STATE_ZERO
			c = readsZero
		} else if e.Type&1 != 0 {
			t.Errorf("nbdinfo --map: [%d, +%d) is a hole not flagged zero (type %d); snapfs's holes read as zeros", e.Offset, e.Length, e.Type)
		}
		s = append(s, segment{start: e.Offset, length: e.Length, class: c})
	}
	if err := checkCoverage(s, r.size); err != nil {
		t.Errorf("nbdinfo --map: %v", err)
	}
	q := qemuSegments(r.mapping)
	var diffs []string
	i, j := 0, 0
	for i < len(q) && j < len(s) && len(diffs) < 8 {
		a, b := q[i], s[j]
		lo, hi := max(a.start, b.start), min(a.start+a.length, b.start+b.length)
		if lo < hi {
			switch {
			case a.class == isData && b.class != isData:
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu-img map says data, NBD block status says zero", lo, hi))
			case a.class == readsZero && b.class == isData:
				diffs = append(diffs, fmt.Sprintf("[%d, %d): qemu-img map says it reads as zero, NBD block status says data", lo, hi))
			}
		}
		if a.start+a.length <= b.start+b.length {
			i++
		} else {
			j++
		}
	}
	if len(diffs) > 0 {
		t.Errorf("nbdinfo --map %s disagrees with qemu-img map:\n  %s", uri, strings.Join(diffs, "\n  "))
	}
}

// checkCopy copies the export with nbdcopy, to stdout (one connection,
// synchronous) and to a file (4 connections, multi-conn), and compares
// with qemu-img convert.
func checkCopy(t *testing.T, uri string, r *serveRef) {
	t.Helper()
	hw := newHashWriter()
	res := runToolOut(t, 2*time.Minute, hw, "nbdcopy", uri, "-")
	if res.code != 0 {
		t.Errorf("%s", res)
	} else if hw.n != r.size || hw.sum() != r.sha256 {
		t.Errorf("nbdcopy %s -: %d bytes, sha256 %s; qemu-img convert gives %d bytes, %s", uri, hw.n, hw.sum(), r.size, r.sha256)
	}

	out := filepath.Join(t.TempDir(), "copy.raw")
	res = runTool(t, 2*time.Minute, "nbdcopy", "--verbose", "--connections=4", "--threads=4", "--requests=16", uri, out)
	if res.code != 0 {
		t.Errorf("%s", res)
		return
	}
	if !strings.Contains(res.stderr, "connections=4 ") || !strings.Contains(res.stderr, "synchronous=false") {
		t.Errorf("nbdcopy did not use 4 connections:\n%s", grepLines(res.stderr, "nbdcopy: "))
	}
	if sum := sha256File(t, out); sum != r.sha256 {
		t.Errorf("nbdcopy -C 4 %s: sha256 %s, qemu-img convert gives %s", uri, sum, r.sha256)
	}
	os.Remove(out)
}

func grepLines(s, prefix string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

// checkCompare runs qemu-img compare of the raw reference against the
// export.
func checkCompare(t *testing.T, uri string, r *serveRef) {
	t.Helper()
	res := runTool(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "raw", r.raw, uri)
	if res.code != 0 || !strings.Contains(string(res.stdout), "Images are identical") {
		t.Errorf("%s\nstdout: %s", res, res.stdout)
	}
}

// checkQemuIO reads the export with qemu-io at odd offsets and lengths:
// the first and last byte, across sector and cluster boundaries, around
// each change between data and zero in qemu-img's map, and at random.
func checkQemuIO(t *testing.T, uri string, r *serveRef) {
	t.Helper()
	var reads []qemuIORead
	add := func(off, n int64) {
		off = max(0, min(off, r.size-1))
		n = max(1, min(n, r.size-off))
		reads = append(reads, qemuIORead{off, n})
	}
	add(0, 1)
	add(r.size-1, 1)
	add(511, 2)
	add(4093, 5)
	add(65535, 3)
	add(r.size-1000, 1000)
	for k, e := range r.mapping {
		if k > 0 && k < 12 {
			add(e.Start-5, 11)
		}
	}
	for _, e := range r.mapping {
		if e.Data && !e.Zero {
			add(e.Start+e.Length/3|1, 4099)
			break
		}
	}
	for k := range 6 {
		add((r.size/7)*int64(k+1)+int64(k*131+17), int64(k*977+313))
	}
	got, res := qemuIOReads(t, uri, reads)
	for k, rd := range reads {
		if got[k] == nil {
			t.Errorf("qemu-io read -v %d %d failed or printed no dump:\n%s\nstdout:\n%s", rd.off, rd.n, res, tail(string(res.stdout), 2000))
			return
		}
		if d := firstDiff(got[k], r.bytes(t, rd.off, rd.n)); d != "" {
			t.Errorf("qemu-io read -v %d %d: %s (qemu-img convert differs)", rd.off, rd.n, d)
		}
	}
	if res.code != 0 {
		t.Errorf("%s", res)
	}
}

// checkFio reads the export with fio's nbd engine: random 4 KiB reads, 32
// in flight, for 2 seconds, with no error.
func checkFio(t *testing.T, uri string) {
	t.Helper()
	res := runTool(t, time.Minute, "fio", "--name=nbd-randread", "--ioengine=nbd", "--uri="+uri,
		"--rw=randread", "--bs=4k", "--iodepth=32", "--runtime=2", "--time_based", "--output-format=json")
	if res.code != 0 {
		t.Errorf("%s\nstdout:\n%s", res, tail(string(res.stdout), 2000))
		return
	}
	js := res.stdout
	if i := bytes.IndexByte(js, '{'); i > 0 {
		js = js[i:]
	}
	var f fioResult
	if err := json.Unmarshal(js, &f); err != nil || len(f.Jobs) != 1 {
		t.Fatalf("fio JSON output: %v\n%s", err, tail(string(res.stdout), 2000))
	}
	j := f.Jobs[0]
	if j.Error != 0 || j.Read.TotalIOs == 0 || j.Read.ShortIOs != 0 || j.Read.DropIOs != 0 || j.Read.IOBytes != 4096*j.Read.TotalIOs {
		t.Errorf("fio on %s: error %d, %d reads, %d bytes, %d short, %d dropped; want no error and whole 4k reads", uri, j.Error, j.Read.TotalIOs, j.Read.IOBytes, j.Read.ShortIOs, j.Read.DropIOs)
	}
}

// checkClient reads with the test's client (simple replies), 16 requests
// in flight, and compares with r.
func checkClient(t *testing.T, what string, c *nbdClient, r *serveRef, seed uint64) {
	t.Helper()
	if c.size != r.size || c.flags&nbdcFlagReadOnly == 0 {
		t.Errorf("%s: size %d, flags %#x; want %d, read-only", what, c.size, c.flags, r.size)
	}
	reads := randomReads(r, 60, seed)
	if err := c.readAll(reads, 16); err != nil {
		t.Errorf("%s: %v", what, err)
		return
	}
	for _, rd := range reads {
		if rd.errno != 0 {
			t.Errorf("%s: read %d+%d: error %d", what, rd.off, len(rd.buf), rd.errno)
			continue
		}
		if d := firstDiff(rd.buf, r.bytes(t, rd.off, int64(len(rd.buf)))); d != "" {
			t.Errorf("%s: read %d+%d: %s", what, rd.off, len(rd.buf), d)
		}
	}
}

// TestServeFaults: a client reading while MinIO stops gets the right bytes
// or EIO, never a hang; with MinIO stopped, reads of blocks not yet fetched
// fail with EIO (qemu-io, and the test's client on a connection opened
// before), the server stays up and takes new connections; once MinIO is
// back the same reads, on the same connections, give the right bytes (no
// failure was cached).
func TestServeFaults(t *testing.T) {
	t.Parallel()
	dir := t.TempDir()
	images.Large(t, dir, "large.qcow2", 64<<20, 3)
	r := rawRef(t, dir, "large.qcow2")
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "faults")
	m.Upload(t, "faults", "img/large.qcow2", filepath.Join(dir, "large.qcow2"))
	p := startServe(t, m.Env(), "--retries", "2", "--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "s3://faults/img/large.qcow2")
	metrics := p.metricsURL(t)
	checkProfiler(t, strings.TrimSuffix(metrics, "/metrics"))
	uri := p.uri("large.qcow2")

	c, err := nbdDial("tcp", p.addr, "large.qcow2", helloGo, time.Now().Add(2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	defer c.close()
	// Reads far apart (more than any fetch), none made before the fault.
	qreads := []qemuIORead{{5<<20 + 123, 4000}, {40<<20 + 7, 333}}
	creads := func() []*nbdRead {
		return []*nbdRead{
			{off: 17<<20 + 1, buf: make([]byte, 70000)},
			{off: 29<<20 + 4093, buf: make([]byte, 4096)},
			{off: 55 << 20, buf: make([]byte, 512)},
		}
	}

	// A client reading while MinIO stops: each reply has the right bytes
	// or EIO, none hangs; reads of blocks never fetched, made once MinIO
	// is down, fail with EIO.
	stride := newStrideReader(t, p.addr, 44<<20, 320<<10, 32, 4)
	stride.waitReads(t, 6)
	m.Stop()
	stride.afterStop(t)

	got, res := qemuIOReads(t, uri, qreads)
	for k, rd := range qreads {
		if got[k] != nil {
			t.Errorf("qemu-io read %d %d succeeded with MinIO stopped", rd.off, rd.n)
		}
	}
	if !strings.Contains(string(res.stdout)+res.stderr, "Input/output error") {
		t.Errorf("qemu-io with MinIO stopped: no \"Input/output error\":\n%s\nstdout:\n%s", res, res.stdout)
	}
	cr := creads()
	if err := c.readAll(cr, 4); err != nil {
		t.Fatalf("client with MinIO stopped: %v", err)
	}
	for _, rd := range cr {
		if rd.errno != 5 {
			t.Errorf("client read %d+%d with MinIO stopped: error %d, want 5 (EIO)", rd.off, len(rd.buf), rd.errno)
		}
	}
	if !p.running() {
		t.Fatalf("the server exited with MinIO stopped:\n%s", p.stderr)
	}
	if !logLine(p.stderr.String(), "request failed", "errno=5", "s3://faults/img/large.qcow2") {
		t.Errorf("no log line says a request failed with EIO, naming the object:\n%s", tail(p.stderr.String(), 3000))
	}
	if v := scrapeMetrics(t, metrics); v["snapfs_fetch_errors_total"] == 0 || v["snapfs_store_errors_total"] == 0 {
		t.Errorf("metrics with MinIO stopped: fetch errors %v, store errors %v; want some", v["snapfs_fetch_errors_total"], v["snapfs_store_errors_total"])
	}
	// New connections are still served.
	if out := mustTool(t, time.Minute, "nbdinfo", "--size", uri); strings.TrimSpace(string(out)) != fmt.Sprint(r.size) {
		t.Errorf("nbdinfo --size with MinIO stopped: %s", out)
	}

	m.Start(t)
	got, res = qemuIOReads(t, uri, qreads)
	for k, rd := range qreads {
		if got[k] == nil {
			t.Errorf("qemu-io read %d %d fails after MinIO restarted:\n%s\nstdout:\n%s", rd.off, rd.n, res, tail(string(res.stdout), 2000))
		} else if d := firstDiff(got[k], r.bytes(t, rd.off, rd.n)); d != "" {
			t.Errorf("qemu-io read %d %d after the restart: %s", rd.off, rd.n, d)
		}
	}
	cr = creads()
	if err := c.readAll(cr, 4); err != nil {
		t.Fatalf("client after MinIO restarted: %v", err)
	}
	for _, rd := range cr {
		if rd.errno != 0 {
			t.Errorf("client read %d+%d after MinIO restarted: error %d (a failure cached?)", rd.off, len(rd.buf), rd.errno)
		} else if d := firstDiff(rd.buf, r.bytes(t, rd.off, int64(len(rd.buf)))); d != "" {
			t.Errorf("client read %d+%d after the restart: %s", rd.off, len(rd.buf), d)
		}
	}
	stride.check(t, r)
	checkCopy(t, uri, r)
	// Nothing is left in flight once the clients are answered.
	if v := scrapeMetrics(t, metrics); v["snapfs_fetches_in_flight"] != 0 || v["snapfs_store_reads_in_flight"] != 0 {
		t.Errorf("metrics after the reads: %v fetches and %v store reads in flight, want 0", v["snapfs_fetches_in_flight"], v["snapfs_store_reads_in_flight"])
	}
}

// strideReader reads 4 KiB blocks at off, off+stride, ... on its own
// connection, one request at a time and paced, over and over, until told
// that MinIO is stopped; then it reads the last fresh blocks, never read
// before, once each.
type strideReader struct {
	c           *nbdClient
	off, stride int64
	n, fresh    int
	stop, done  chan struct{}

	mu       sync.Mutex
	replies  int
	eio      int              // EIO replies while cycling
	freshEIO int              // EIO replies to the fresh blocks
	got      map[int64][]byte // the last successful read of each block
	bad      []string
}

func newStrideReader(t *testing.T, addr string, off, stride int64, n, fresh int) *strideReader {
	t.Helper()
	c, err := nbdDial("tcp", addr, "", helloGo, time.Now().Add(2*time.Minute))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.close)
	s := &strideReader{c: c, off: off, stride: stride, n: n, fresh: fresh,
		stop: make(chan struct{}), done: make(chan struct{}), got: map[int64][]byte{}}
	go s.run()
	return s
}

func (s *strideReader) block(k int) int64 { return s.off + int64(k)*s.stride }

// read reads block k and records the outcome; false if the connection
// failed.
func (s *strideReader) read(k int, fresh bool) bool {
	off := s.block(k)
	b, errno, err := s.c.read(off, 4096)
	s.mu.Lock()
	defer s.mu.Unlock()
	s.replies++
	switch {
	case err != nil:
		s.bad = append(s.bad, fmt.Sprintf("read at %d: %v", off, err))
		return false
	case fresh && errno != 5:
		s.bad = append(s.bad, fmt.Sprintf("read at %d (never read before) with MinIO stopped: error %d, want 5 (EIO)", off, errno))
	case errno == 0:
		s.got[off] = b
	case errno == 5 && fresh:
		s.freshEIO++
	case errno == 5:
		s.eio++
	default:
		s.bad = append(s.bad, fmt.Sprintf("read at %d: error %d, want 0 or 5", off, errno))
	}
	return true
}

func (s *strideReader) run() {
	defer close(s.done)
	for k := 0; ; k = (k + 1) % (s.n - s.fresh) {
		select {
		case <-s.stop:
			for f := s.n - s.fresh; f < s.n; f++ {
				if !s.read(f, true) {
					return
				}
			}
			return
		default:
		}
		if !s.read(k, false) {
			return
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitReads waits until k replies came.
func (s *strideReader) waitReads(t *testing.T, k int) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		s.mu.Lock()
		n, bad := s.replies, s.bad
		s.mu.Unlock()
		if n >= k {
			return
		}
		select {
		case <-s.done:
			t.Fatalf("the reader stopped after %d replies: %v", n, bad)
		case <-time.After(5 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d replies in 30s, want %d", n, k)
		}
	}
}

// afterStop tells the reader MinIO is stopped and waits for it to finish.
func (s *strideReader) afterStop(t *testing.T) {
	t.Helper()
	close(s.stop)
	select {
	case <-s.done:
	case <-time.After(90 * time.Second):
		t.Fatalf("a read hung with MinIO stopped")
	}
}

// check checks what was read against r, then reads every block again on
// the same connection (MinIO being back), which must work.
func (s *strideReader) check(t *testing.T, r *serveRef) {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, b := range s.bad {
		t.Error(b)
	}
	if s.freshEIO != s.fresh {
		t.Errorf("%d of %d reads of blocks never read before failed with EIO while MinIO was stopped", s.freshEIO, s.fresh)
	}
	for off, b := range s.got {
		if d := firstDiff(b, r.bytes(t, off, int64(len(b)))); d != "" {
			t.Errorf("read at %d around the stop: %s", off, d)
		}
	}
	t.Logf("reads around the stop: %d replies, %d EIO while cycling, %d of %d fresh blocks EIO", s.replies, s.eio, s.freshEIO, s.fresh)
	for k := range s.n {
		b, errno, err := s.c.read(s.block(k), 4096)
		if err != nil || errno != 0 {
			t.Errorf("read at %d after MinIO restarted, on the connection open all along: error %d, %v", s.block(k), errno, err)
		} else if d := firstDiff(b, r.bytes(t, s.block(k), 4096)); d != "" {
			t.Errorf("read at %d after MinIO restarted: %s", s.block(k), d)
		}
	}
}

// TestServeSignals: SIGTERM and SIGINT stop serve with exit 0, also with
// clients connected (one idle, one copying), and the port is closed.
func TestServeSignals(t *testing.T) {
	t.Parallel()
	dir, corpus, _ := imageSet(t)
	im := byName(t, corpus, "v3-64k")
	for _, sig := range []syscall.Signal{syscall.SIGTERM, syscall.SIGINT} {
		t.Run(sig.String(), func(t *testing.T) {
			args := []string{"--listen", "127.0.0.1:0", fileURL(filepath.Join(dir, im.Key))}
			var sock string
			if sig == syscall.SIGINT {
				// Both a unix socket and TCP.
				sockDir, err := os.MkdirTemp("", "snapfs-nbd-")
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { os.RemoveAll(sockDir) })
				sock = filepath.Join(sockDir, "s")
				args = append([]string{"--socket", sock}, args...)
			}
			p := startServe(t, nil, args...)
			if sock != "" {
				if p.socket != sock || p.addr == "" {
					t.Fatalf("want listeners on %s and TCP:\n%s", sock, p.stderr)
				}
				if out := mustTool(t, time.Minute, "nbdinfo", "--size", "nbd+unix:///?socket="+sock); strings.TrimSpace(string(out)) != "67108864" {
					t.Errorf("nbdinfo --size over the socket: %s", out)
				}
			}
			idle, err := nbdDial("tcp", p.addr, "", helloGo, time.Now().Add(time.Minute))
			if err != nil {
				t.Fatal(err)
			}
			defer idle.close()
			if _, errno, err := idle.read(1<<20, 4096); err != nil || errno != 0 {
				t.Fatalf("read before the signal: %v, error %d", err, errno)
			}
			// A copy in progress when the signal comes.
			copying := make(chan *toolResult, 1)
			go func() {
				copying <- runToolOut(t, time.Minute, newHashWriter(), "nbdcopy", "--synchronous", p.uri(""), "-")
			}()
			time.Sleep(100 * time.Millisecond)
			start := time.Now()
			if code := p.signal(t, sig, 15*time.Second); code != 0 {
				t.Errorf("exit %d on %v, want 0:\n%s", code, sig, p.stderr)
			}
			t.Logf("%v: serve exited after %v", sig, time.Since(start).Round(time.Millisecond))
			res := <-copying
			t.Logf("nbdcopy during the shutdown: exit %d", res.code)
			if c, err := net.DialTimeout("tcp", p.addr, time.Second); err == nil {
				c.Close()
				t.Errorf("%s still accepts connections after serve exited", p.addr)
			}
			if _, err := os.Lstat(sock); sock != "" && !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the socket %s is still there after serve exited (%v)", sock, err)
			}
		})
	}
}

// TestServeTLS: with --tls require, plain clients are refused (libnbd, and
// the test's client gets NBD_REP_ERR_TLS_REQD) and libnbd's GnuTLS clients
// read over nbds:// with the CA; a client that does not trust the CA
// cannot connect. With --tls allow, both work.
func TestServeTLS(t *testing.T) {
	t.Parallel()
	dir, corpus, _ := imageSet(t)
	im := byName(t, corpus, "zstd-64k")
	r := rawRef(t, dir, im.Key)
	certs, other := t.TempDir(), t.TempDir()
	writeTLSFiles(t, certs)
	writeTLSFiles(t, other) // another CA
	u := fileURL(filepath.Join(dir, im.Key))
	for _, mode := range []string{"require", "allow"} {
		t.Run(mode, func(t *testing.T) {
			t.Parallel()
			p := startServe(t, nil, "--listen", "127.0.0.1:0", "--tls", mode,
				"--tls-cert", filepath.Join(certs, "server-cert.pem"), "--tls-key", filepath.Join(certs, "server-key.pem"), u)
			tlsURI := "nbds://" + p.addr + "/?tls-certificates=" + certs
			res := runTool(t, time.Minute, "nbdinfo", tlsURI)
			if res.code != 0 || !strings.Contains(string(res.stdout), "with TLS") {
				t.Errorf("nbdinfo over TLS:\n%s\nstdout:\n%s", res, res.stdout)
			}
			if out := mustTool(t, time.Minute, "nbdinfo", "--size", tlsURI); strings.TrimSpace(string(out)) != fmt.Sprint(r.size) {
				t.Errorf("nbdinfo --size over TLS: %s, want %d", out, r.size)
			}
			checkCopy(t, tlsURI, r)
			if res := runTool(t, time.Minute, "nbdinfo", "--size", "nbds://"+p.addr+"/?tls-certificates="+other); res.code == 0 {
				t.Errorf("nbdinfo trusting another CA connected over TLS")
			}
			plain := runTool(t, time.Minute, "nbdinfo", "--size", p.uri(""))
			c, err := nbdDial("tcp", p.addr, "", helloGo, time.Now().Add(time.Minute))
			if mode == "require" {
				if plain.code == 0 {
					t.Errorf("nbdinfo without TLS was served with --tls require")
				}
				var oe *nbdOptError
				if !errors.As(err, &oe) || oe.typ != 1<<31|5 {
					t.Errorf("NBD_OPT_GO without TLS: %v; want NBD_REP_ERR_TLS_REQD", err)
				}
				return
			}
			if plain.code != 0 || strings.TrimSpace(string(plain.stdout)) != fmt.Sprint(r.size) {
				t.Errorf("nbdinfo without TLS with --tls allow:\n%s", plain)
			}
			if err != nil {
				t.Fatalf("client without TLS with --tls allow: %v", err)
			}
			checkClient(t, "client without TLS", c, r, 5)
			c.close()
		})
	}
}

// TestAttach: attach needs a kernel NBD device; without one it must say to
// load the nbd module.
func TestAttach(t *testing.T) {
	t.Parallel()
	dir, corpus, _ := imageSet(t)
	u := fileURL(filepath.Join(dir, byName(t, corpus, "v3-64k").Key))

	t.Run("missing-device", func(t *testing.T) {
		t.Parallel()
		res := runCLI(t, cliRun{args: []string{"attach", u, "/dev/nbd-does-not-exist"}, timeout: 30 * time.Second})
		if res.code == 0 {
			t.Errorf("attach to a missing device succeeded:\n%s", res)
		}
		if !strings.Contains(res.stderr, "modprobe nbd") || !strings.Contains(res.stderr, "/dev/nbd-does-not-exist") {
			t.Errorf("the error does not name the device and say modprobe nbd:\n%s", res)
		}
	})

	t.Run("nbd0", func(t *testing.T) {
		t.Parallel()
		if _, err := os.Stat("/dev/nbd0"); err != nil {
			t.Log("skipped: /dev/nbd0 missing (no kernel nbd module on this machine)")
			t.Skip("skipped: /dev/nbd0 missing (no kernel nbd module on this machine)")
		}
		if _, err := os.Stat("/sys/block/nbd0/pid"); err == nil {
			t.Skip("/dev/nbd0 is in use")
		}
		r := rawRef(t, dir, byName(t, corpus, "v3-64k").Key)
		p := &serveProc{stderr: &lockedBuffer{}, done: make(chan struct{})}
		cmd := exec.Command(snapfsBin, "attach", u, "/dev/nbd0")
		cmd.Env = cleanEnv()
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		cmd.Stderr = p.stderr
		p.cmd = cmd
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		go func() {
			cmd.Wait()
			p.state = cmd.ProcessState
			close(p.done)
		}()
		t.Cleanup(func() {
			if p.running() {
				cmd.Process.Signal(syscall.SIGTERM)
				select {
				case <-p.done:
				case <-time.After(15 * time.Second):
					syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
					<-p.done
				}
			}
			p.checkNoCrash(t)
		})
		deadline := time.Now().Add(30 * time.Second)
		for !strings.Contains(p.stderr.String(), "attached to /dev/nbd0") {
			if !p.running() || time.Now().After(deadline) {
				t.Fatalf("attach did not attach /dev/nbd0 within 30s (%v):\n%s", p.state, p.stderr)
			}
			time.Sleep(50 * time.Millisecond)
		}
		res := runTool(t, time.Minute, "sha256sum", "/dev/nbd0")
		if res.code != 0 || !strings.HasPrefix(string(res.stdout), r.sha256) {
			t.Errorf("sha256sum /dev/nbd0: %s (want %s)\n%s", res.stdout, r.sha256, res)
		}
		if code := p.signal(t, syscall.SIGTERM, 15*time.Second); code != 0 {
			t.Errorf("attach exits %d on SIGTERM, want 0:\n%s", code, p.stderr)
		}
	})
}
