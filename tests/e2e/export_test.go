package e2e

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/minio/minio-go/v7"

	"github.com/snapfs/snapfs/tests/harness"
)

// exShape is a raw source of the export tests: size bytes, with random
// or compressible data in ranges and zeros (holes) elsewhere.
type exShape struct {
	name    string
	size    int64
	ranges  [][2]int64
	text    bool     // compressible text instead of random bytes
	dense   bool     // write the zeros too (no holes)
	args    []string // export flags
	version int      // 2 or 3
	ctype   string   // compression type qemu-img info reports (v3)
}

// makeRaw writes the shape as a file and returns its path and the sha256
// of its raw content (the size rounded up to 512 bytes).
func (s exShape) makeRaw(t *testing.T, dir string) (string, string) {
	t.Helper()
	path := filepath.Join(dir, s.name+".raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if s.dense {
		if _, err := f.Write(make([]byte, s.size)); err != nil {
			t.Fatal(err)
		}
	} else if err := f.Truncate(s.size); err != nil {
		t.Fatal(err)
	}
	r := rand.New(rand.NewPCG(uint64(s.size), 3))
	words := []string{"export ", "bucket ", "cluster ", "snapshot ", "\n"}
	for _, rg := range s.ranges {
		b := make([]byte, rg[1]-rg[0])
		if s.text {
			var sb strings.Builder
			for sb.Len() < len(b) {
				sb.WriteString(words[r.IntN(len(words))])
			}
			copy(b, sb.String())
		} else {
			for i := range b {
				b[i] = byte(r.Uint32()) | 1
			}
		}
		if _, err := f.WriteAt(b, rg[0]); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	h.Write(make([]byte, (s.size+511)&^511-s.size))
	return path, hex.EncodeToString(h.Sum(nil))
}

// exportSummary parses export's summary lines ("key: value").
func exportSummary(t *testing.T, out []byte) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, line := range strings.Split(string(out), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok && !strings.HasPrefix(line, "exported") {
			m[strings.TrimSpace(k)] = strings.TrimSpace(v)
		}
	}
	return m
}

// judgeExport checks a downloaded export with qemu-img against the raw
// source: check clean, compare identical, info's virtual size and
// compression type.
func judgeExport(t *testing.T, img, raw string, size int64, version int, ctype string) {
	t.Helper()
	res := runTool(t, 2*time.Minute, "qemu-img", "check", "--output=json", "-f", "qcow2", img)
	if res.code != 0 {
		t.Fatalf("qemu-img check: %s", res)
	}
	var chk map[string]any
	if err := json.Unmarshal([]byte(res.stdout), &chk); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"leaks", "corruptions", "check-errors"} {
		if v, ok := chk[k]; ok && v.(float64) != 0 {
			t.Fatalf("qemu-img check: %s = %v\n%s", k, v, res.stdout)
		}
	}
	if res := runTool(t, 2*time.Minute, "qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, img); res.code != 0 {
		t.Fatalf("qemu-img compare: %s", res)
	}
	res = runTool(t, time.Minute, "qemu-img", "info", "--output=json", "-f", "qcow2", img)
	var info struct {
		VirtualSize    int64 `json:"virtual-size"`
		FormatSpecific struct {
			Data struct {
				Compat          string `json:"compat"`
				CompressionType string `json:"compression-type"`
			} `json:"data"`
		} `json:"format-specific"`
	}
	if err := json.Unmarshal([]byte(res.stdout), &info); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, res)
	}
	if want := (size + 511) &^ 511; info.VirtualSize != want {
		t.Errorf("virtual size %d, want %d", info.VirtualSize, want)
	}
	wantCompat := map[int]string{2: "0.10", 3: "1.1"}[version]
	if info.FormatSpecific.Data.Compat != wantCompat {
		t.Errorf("compat %q, want %q", info.FormatSpecific.Data.Compat, wantCompat)
	}
	if version == 3 && info.FormatSpecific.Data.CompressionType != ctype {
		t.Errorf("compression type %q, want %q", info.FormatSpecific.Data.CompressionType, ctype)
	}
}

// TestExport exports raw files of several shapes into MinIO and judges
// the objects with qemu-img, snapfs cat and snapfs digest.
func TestExport(t *testing.T) {
	t.Parallel()
	m := harness.StartMinIO(t)
	const bucket = "exports"
	m.MakeBucket(t, bucket)
	env := m.Env()
	client := m.Client(t)
	const M = 1 << 20
	shapes := []exShape{
		{name: "empty", size: 0},
		{name: "no-data", size: 20 * M},
		{name: "zeros-written", size: 6 * M, dense: true},
		{name: "random", size: 20 * M, ranges: [][2]int64{{0, 20 * M}}},
		{name: "both-ends", size: 64 * M, ranges: [][2]int64{{0, 3000}, {64*M - 100000, 64 * M}}},
		{name: "unaligned", size: 3*M + 777, ranges: [][2]int64{{100, 200}, {3 * M, 3*M + 777}}},
		{name: "c512", size: 2*M + 512, ranges: [][2]int64{{4096, 600000}}, args: []string{"--cluster-size", "512"}},
		{name: "c2m", size: 24 * M, ranges: [][2]int64{{5 * M, 15 * M}, {24*M - 1, 24 * M}}, args: []string{"--cluster-size", "2M"}},
		{name: "v2", size: 12 * M, ranges: [][2]int64{{M, 11 * M}}, args: []string{"--compat", "0.10"}, version: 2},
		{name: "zlib", size: 16 * M, ranges: [][2]int64{{0, 14 * M}}, text: true, args: []string{"--compress", "zlib"}, ctype: "zlib"},
		{name: "zstd", size: 16 * M, ranges: [][2]int64{{0, 14 * M}}, text: true, args: []string{"--compress", "zstd", "--jobs", "3"}, ctype: "zstd"},
		{name: "zlib-v2-512", size: 3 * M, ranges: [][2]int64{{0, 2 * M}}, text: true, args: []string{"--compress", "zlib", "--compat", "0.10", "--cluster-size", "512"}, version: 2},
	}
	for _, s := range shapes {
		t.Run(s.name, func(t *testing.T) {
			t.Parallel()
			if s.version == 0 {
				s.version = 3
			}
			if s.ctype == "" {
				s.ctype = "zlib"
			}
			dir := t.TempDir()
			raw, rawSum := s.makeRaw(t, dir)
			key := "vm/" + s.name + ".qcow2"
			url := "s3://" + bucket + "/" + key
			args := append([]string{"export", raw, url, "--meta", "Owner=e2e"}, s.args...)
			res := runCLI(t, cliRun{args: args, env: env})
			if res.code != 0 {
				t.Fatalf("export: %s", res)
			}
			sum := exportSummary(t, res.stdout)
			if sum["raw sha256"] != rawSum {
				t.Errorf("export reports raw sha256 %q, want %q\n%s", sum["raw sha256"], rawSum, res.stdout)
			}

			// The object and its metadata.
			ctx := context.Background()
			info, err := client.StatObject(ctx, bucket, key, minio.StatObjectOptions{})
			if err != nil {
				t.Fatal(err)
			}
			meta := map[string]string{}
			for k, v := range info.UserMetadata {
				meta[strings.ToLower(k)] = v
			}
			vsize := (s.size + 511) &^ 511
			if meta["snapfs-raw-sha256"] != rawSum || meta["snapfs-virtual-size"] != strconv.FormatInt(vsize, 10) ||
				meta["snapfs-source"] != raw || meta["owner"] != "e2e" {
				t.Errorf("object metadata %v; want digest %s, virtual size %d, source %s, owner e2e", meta, rawSum, vsize, raw)
			}
			img := filepath.Join(dir, "obj.qcow2")
			if err := client.FGetObject(ctx, bucket, key, img, minio.GetObjectOptions{}); err != nil {
				t.Fatal(err)
			}
			judgeExport(t, img, raw, s.size, s.version, s.ctype)
			fi, _ := os.Stat(img)
			if s.text && fi.Size() >= s.ranges[0][1]-s.ranges[0][0] {
				t.Errorf("compressed export of %d bytes is not smaller than the %d data bytes", fi.Size(), s.ranges[0][1]-s.ranges[0][0])
			}
			if s.name == "no-data" || s.name == "zeros-written" || s.name == "empty" {
				if sum["allocated"] == "" || !strings.HasPrefix(sum["allocated"], "0 B") {
					t.Errorf("allocated %q, want nothing", sum["allocated"])
				}
			}

			// snapfs reads it back byte-exact, and its digests agree.
			got, n, cres := catSHA(t, cliRun{args: []string{"cat", url}, env: env})
			if cres.code != 0 || got != rawSum || n != vsize {
				t.Errorf("snapfs cat: sha %s of %d bytes, want %s of %d\n%s", got, n, rawSum, vsize, cres)
			}
			d1 := runCLI(t, cliRun{args: []string{"digest", raw}, env: env})
			d2 := runCLI(t, cliRun{args: []string{"digest", url}, env: env})
			if d1.code != 0 || d2.code != 0 || !strings.HasPrefix(string(d1.stdout), rawSum+" ") || !strings.HasPrefix(string(d2.stdout), rawSum+" ") {
				t.Errorf("digests: source %s object %s, want %s\n%s\n%s", d1.stdout, d2.stdout, rawSum, d1, d2)
			}
			if !strings.Contains(d2.stderr, "matches its snapfs-raw-sha256") {
				t.Errorf("digest of the object did not check the metadata:\n%s", d2)
			}
		})
	}

	// An export read back through snapfs import verifies against its
	// digest; a corrupted object fails that verification, and digest's.
	t.Run("import-and-corrupt", func(t *testing.T) {
		dir := t.TempDir()
		s := exShape{name: "tocorrupt", size: 4*M + 1000, ranges: [][2]int64{{0, 2 * M}, {4 * M, 4*M + 1000}}}
		raw, rawSum := s.makeRaw(t, dir)
		url := "s3://" + bucket + "/corrupt.qcow2"
		if res := runCLI(t, cliRun{args: []string{"export", raw, url, "--compress", "zlib"}, env: env}); res.code != 0 {
			t.Fatalf("export: %s", res)
		}
		vol := filepath.Join(dir, "imported.raw")
		res := runCLI(t, cliRun{args: []string{"--log-level", "info", "import", url, vol}, env: env})
		if res.code != 0 || !strings.Contains(res.stderr, "verified") {
			t.Fatalf("import of the export: %s", res)
		}
		if got := sha256File(t, vol); got != rawSum {
			t.Errorf("imported volume sha256 %s, want %s", got, rawSum)
		}
		ctx := context.Background()
		info, err := client.StatObject(ctx, bucket, "corrupt.qcow2", minio.StatObjectOptions{})
		if err != nil {
			t.Fatal(err)
		}
		img := filepath.Join(dir, "obj.qcow2")
		if err := client.FGetObject(ctx, bucket, "corrupt.qcow2", img, minio.GetObjectOptions{}); err != nil {
			t.Fatal(err)
		}
		// Flip a byte of the first data cluster (cluster 1), keep the metadata.
		b, err := os.ReadFile(img)
		if err != nil {
			t.Fatal(err)
		}
		b[65536+100] ^= 0xff
		if err := os.WriteFile(img, b, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := client.FPutObject(ctx, bucket, "corrupt.qcow2", img, minio.PutObjectOptions{UserMetadata: info.UserMetadata}); err != nil {
			t.Fatal(err)
		}
		res = runCLI(t, cliRun{args: []string{"digest", url}, env: env})
		if res.code != 1 || !strings.Contains(res.stderr, "does not match its snapfs-raw-sha256") || !strings.Contains(res.stderr, "corrupt.qcow2") {
			t.Errorf("digest of a corrupted object: want exit 1 naming the object and the mismatch:\n%s", res)
		}
		res = runCLI(t, cliRun{args: []string{"import", url, filepath.Join(dir, "bad.raw")}, env: env})
		if res.code == 0 || !strings.Contains(res.stderr, "does not match the image's raw sha256") {
			t.Errorf("import of a corrupted object: want a digest mismatch:\n%s", res)
		}
	})

	// Bad options are refused before an upload starts.
	t.Run("bad-options", func(t *testing.T) {
		dir := t.TempDir()
		raw := filepath.Join(dir, "r.raw")
		if err := os.WriteFile(raw, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
		for _, c := range [][]string{
			{"--compress", "lz4", "compression"},
			{"--cluster-size", "3k", "cluster size"},
			{"--compress", "zstd", "--compat", "0.10", "zstd"},
			{"--meta", "no equals", "KEY=VALUE"},
		} {
			args := append([]string{"export", raw, "s3://" + bucket + "/bad.qcow2"}, c[:len(c)-1]...)
			res := runCLI(t, cliRun{args: args, env: env})
			if res.code != 2 || !strings.Contains(res.stderr, c[len(c)-1]) {
				t.Errorf("%v: want exit 2 about %q:\n%s", c, c[len(c)-1], res)
			}
		}
		if left := multipartLeft(t, client, bucket); len(left) != 0 {
			t.Errorf("uploads started: %v", left)
		}

		// A missing bucket is found by a listing before the source is
		// hashed: the error comes from that listing and names the bucket.
		res := runCLI(t, cliRun{args: []string{"export", raw, "s3://no-such-bucket/x.qcow2"}, env: env})
		if res.code != 1 || !strings.Contains(res.stderr, "list s3://no-such-bucket/x.qcow2") || !strings.Contains(res.stderr, "NoSuchBucket") {
			t.Errorf("export into a missing bucket: want exit 1 from the listing:\n%s", res)
		}
	})

	// stdin needs --size; a file:// target is written whole.
	t.Run("stdin-file-target", func(t *testing.T) {
		dir := t.TempDir()
		s := exShape{name: "piped", size: 9*M + 4000, ranges: [][2]int64{{M, 9*M + 4000}}}
		raw, rawSum := s.makeRaw(t, dir)
		res := runCLI(t, cliRun{args: []string{"export", "-", fileURL(filepath.Join(dir, "b/x.qcow2"))}})
		if res.code == 0 || !strings.Contains(res.stderr, "--size") {
			t.Errorf("stdin without --size: %s", res)
		}
		f, err := os.Open(raw)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		target := filepath.Join(dir, "bucket/vm.qcow2")
		if err := os.Mkdir(filepath.Join(dir, "bucket"), 0o755); err != nil {
			t.Fatal(err)
		}
		res = runCLI(t, cliRun{args: []string{"export", "-", fileURL(target), "--size", strconv.FormatInt(s.size, 10), "--compress", "zstd"}, stdin: struct{ io.Reader }{f}})
		if res.code != 0 {
			t.Fatalf("export from stdin: %s", res)
		}
		if sum := exportSummary(t, res.stdout); sum["raw sha256"] != rawSum {
			t.Errorf("raw sha256 %q, want %q", sum["raw sha256"], rawSum)
		}
		judgeExport(t, target, raw, s.size, 3, "zstd")
		ents, _ := os.ReadDir(filepath.Join(dir, "bucket"))
		for _, e := range ents {
			if e.Name() != "vm.qcow2" && e.Name() != ".vm.qcow2.snapfs-meta.json" && e.Name() != ".snapfs-uploads" {
				t.Errorf("left in the bucket directory: %s", e.Name())
			}
		}
		ups, _ := os.ReadDir(filepath.Join(dir, "bucket/.snapfs-uploads"))
		if len(ups) != 0 {
			t.Errorf("%d uploads left", len(ups))
		}
		d := runCLI(t, cliRun{args: []string{"digest", fileURL(target)}})
		if !strings.HasPrefix(string(d.stdout), rawSum) {
			t.Errorf("digest of the file:// object: %s", d)
		}
		// A stream is hashed as it goes: its digest metadata is set after
		// the upload, by the copy.
		if !strings.Contains(d.stderr, "matches its snapfs-raw-sha256") {
			t.Errorf("the stdin export has no digest metadata: %s", d)
		}
	})
}

// slowFeed writes n random bytes to w in 1 MiB pieces, pausing between
// them, and calls at(written) after each piece; it stops at the first
// write error (the reader is gone).
func slowFeed(w io.WriteCloser, n int64, pause time.Duration, at func(int64)) {
	defer w.Close()
	r := rand.New(rand.NewPCG(9, 9))
	buf := make([]byte, 1<<20)
	for off := int64(0); off < n; off += int64(len(buf)) {
		for i := range buf {
			buf[i] = byte(r.Uint32()) | 1
		}
		if _, err := w.Write(buf[:min(int64(len(buf)), n-off)]); err != nil {
			return
		}
		at(off + int64(len(buf)))
		time.Sleep(pause)
	}
}

// multipartLeft lists the multipart uploads MinIO still holds in bucket.
func multipartLeft(t *testing.T, c *minio.Client, bucket string) []string {
	t.Helper()
	core := minio.Core{Client: c}
	res, err := core.ListMultipartUploads(context.Background(), bucket, "", "", "", "", 1000)
	if err != nil {
		t.Fatalf("ListMultipartUploads: %v", err)
	}
	var out []string
	for _, u := range res.Uploads {
		out = append(out, u.Key+" "+u.UploadID)
	}
	return out
}

// childPid returns the pid of the only child of pid (the CLI under the
// runner), or 0 after 10 s. Children are listed per thread of pid.
func childPid(pid int) int {
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		tasks, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/children", pid))
		for _, task := range tasks {
			b, _ := os.ReadFile(task)
			if f := strings.Fields(string(b)); len(f) == 1 {
				n, _ := strconv.Atoi(f[0])
				return n
			}
		}
		time.Sleep(20 * time.Millisecond)
	}
	return 0
}

// TestExportAborts: an export whose store goes away, or that is
// interrupted, fails with a clear error, and leaves neither an object nor
// an unfinished multipart upload behind.
func TestExportAborts(t *testing.T) {
	t.Parallel()
	m := harness.StartMinIO(t)
	const bucket = "aborts"
	m.MakeBucket(t, bucket)
	env := m.Env()
	client := m.Client(t)
	const size = 96 << 20

	// run exports a slowly fed stdin and calls fault with the runner's pid
	// and the running result once 28 MiB went in: part 1 is held, parts 2
	// and 3 are sent.
	run := func(t *testing.T, key string, fault func(runner int, res *result)) *result {
		pr, pw := io.Pipe()
		c := cliRun{args: []string{"export", "-", "s3://" + bucket + "/" + key, "--size", strconv.Itoa(size), "--retries", "1"},
			env: env, stdin: pr, timeout: 3 * time.Minute}
		res, cmd, cancel := startCLI(t, c, nil)
		defer cancel()
		fired := false
		go slowFeed(pw, size, 30*time.Millisecond, func(n int64) {
			if n >= 28<<20 && !fired {
				fired = true
				fault(cmd.Process.Pid, res)
			}
		})
		waitCLI(t, res, cmd)
		pr.Close()
		return res
	}

	t.Run("minio-stopped", func(t *testing.T) {
		restarted := make(chan struct{})
		res := run(t, "stopped.qcow2", func(_ int, cur *result) {
			m.Stop()
			// Bring the server back once the export has given up on the
			// parts, so that its abort can reach it.
			go func() {
				defer close(restarted)
				deadline := time.Now().Add(2 * time.Minute)
				for time.Now().Before(deadline) && !strings.Contains(cur.stderrBuf.String(), "aborting the upload") {
					time.Sleep(50 * time.Millisecond)
				}
				time.Sleep(time.Second)
				m.Start(t)
			}()
		})
		<-restarted
		if res.code != 1 || !strings.Contains(res.stderr, "upload was aborted") || !strings.Contains(res.stderr, "s3://"+bucket+"/stopped.qcow2") {
			t.Errorf("want exit 1 with an error naming the object and the abort:\n%s", res)
		}
		if left := multipartLeft(t, client, bucket); len(left) != 0 {
			t.Errorf("multipart uploads left behind: %v", left)
		}
		if _, err := client.StatObject(context.Background(), bucket, "stopped.qcow2", minio.StatObjectOptions{}); err == nil {
			t.Error("a partial object is visible")
		}
		t.Logf("stderr:\n%s", res.stderr)
	})

	t.Run("sigint", func(t *testing.T) {
		res := run(t, "interrupted.qcow2", func(runner int, _ *result) {
			if pid := childPid(runner); pid > 0 {
				syscall.Kill(pid, syscall.SIGINT)
			} else {
				t.Errorf("no snapfs process under the runner %d", runner)
			}
		})
		if res.code != 1 || !strings.Contains(res.stderr, "interrupted") || !strings.Contains(res.stderr, "upload was aborted") {
			t.Errorf("want exit 1, interrupted, upload aborted:\n%s", res)
		}
		if left := multipartLeft(t, client, bucket); len(left) != 0 {
			t.Errorf("multipart uploads left behind: %v", left)
		}
		if _, err := client.StatObject(context.Background(), bucket, "interrupted.qcow2", minio.StatObjectOptions{}); err == nil {
			t.Error("a partial object is visible")
		}
	})
}

// exportMemBound is the peak RSS an export of a 4 GiB disk may reach: part
// 1 and five 8 MiB part buffers (four uploading, one filling), the
// reader/compressor batches, the refcounts (2 bytes per host cluster),
// the HTTP client and the Go runtime.
const exportMemBound = 128 << 20

// TestExportMemory exports a sparse 4 GiB disk with 64 MiB of data spread
// over it (zstd, so the compression buffers are in use too) and checks the
// process's peak RSS (VmHWM, from the runner's rusage) against
// exportMemBound.
func TestExportMemory(t *testing.T) {
	t.Parallel()
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "mem")
	const G, M = int64(1) << 30, int64(1) << 20
	s := exShape{name: "big", size: 4 * G}
	for off := int64(0); off < s.size; off += 64 * M {
		s.ranges = append(s.ranges, [2]int64{off + 5*M, off + 6*M})
	}
	s.text = true
	raw, rawSum := s.makeRaw(t, t.TempDir())
	for _, mode := range []string{"none", "zstd"} {
		res := runCLI(t, cliRun{args: []string{"export", raw, "s3://mem/" + mode + ".qcow2", "--compress", mode}, env: m.Env(), timeout: 5 * time.Minute})
		if res.code != 0 {
			t.Fatalf("export: %s", res)
		}
		if sum := exportSummary(t, res.stdout); sum["raw sha256"] != rawSum {
			t.Errorf("raw sha256 %q, want %q", sum["raw sha256"], rawSum)
		}
		t.Logf("%s: peak RSS %d MiB (bound %d MiB), %v", mode, res.maxRSS>>20, exportMemBound>>20, res.elapsed.Round(time.Millisecond))
		if res.maxRSS == 0 || res.maxRSS > exportMemBound {
			t.Errorf("%s: peak RSS %d bytes, bound %d", mode, res.maxRSS, exportMemBound)
		}
	}
}

// TestExportFromFUSE exports the raw file of an image mounted by snapfs
// mount (the "export from a mounted device" case): holes come from the
// mount's SEEK_DATA/SEEK_HOLE, data through FUSE reads.
func TestExportFromFUSE(t *testing.T) {
	t.Parallel()
	fuseNeed(t)
	m := harness.StartMinIO(t)
	m.MakeBucket(t, "out")
	const M = 1 << 20
	dir := t.TempDir()
	s := exShape{name: "mounted", size: 40 * M, ranges: [][2]int64{{0, 2 * M}, {17 * M, 19*M + 5}, {40*M - 4096, 40 * M}}}
	raw, rawSum := s.makeRaw(t, dir)
	bucket := filepath.Join(dir, "bucket")
	if err := os.Mkdir(bucket, 0o755); err != nil {
		t.Fatal(err)
	}
	if res := runTool(t, time.Minute, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, filepath.Join(bucket, "vm.qcow2")); res.code != 0 {
		t.Fatalf("qemu-img convert: %s", res)
	}
	mnt := t.TempDir()
	p := fuseMount(t, nil, mnt, "mount", fileURL(filepath.Join(bucket, "vm.qcow2")), mnt)
	defer p.wait(t, 30*time.Second)
	defer exec.Command(snapfsBin, "umount", mnt).Run()

	res := runCLI(t, cliRun{args: []string{"export", filepath.Join(mnt, "vm.raw"), "s3://out/copy.qcow2", "--compress", "zlib"}, env: m.Env()})
	if res.code != 0 {
		t.Fatalf("export from the mount: %s", res)
	}
	if sum := exportSummary(t, res.stdout); sum["raw sha256"] != rawSum {
		t.Errorf("raw sha256 %q, want %q", sum["raw sha256"], rawSum)
	}
	img := filepath.Join(dir, "copy.qcow2")
	if err := m.Client(t).FGetObject(context.Background(), "out", "copy.qcow2", img, minio.GetObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	judgeExport(t, img, raw, s.size, 3, "zlib")
}

// TestExportBlockDevice exports a loop device (a block device: its size
// from SEEK_END) and compares the object with the file behind it. It is
// skipped where loop devices cannot be set up.
func TestExportBlockDevice(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("losetup"); err != nil {
		t.Skip("no losetup")
	}
	const M = 1 << 20
	dir := t.TempDir()
	s := exShape{name: "blockdev", size: 24 * M, ranges: [][2]int64{{M, 3 * M}, {20 * M, 24 * M}}}
	raw, rawSum := s.makeRaw(t, dir)
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", raw).CombinedOutput()
	if err != nil {
		t.Skipf("losetup: %v: %s", err, out)
	}
	dev := strings.TrimSpace(string(out))
	t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
	if fi, err := os.Stat(dev); err != nil || fi.Mode()&os.ModeDevice == 0 {
		t.Fatalf("%s is not a device: %v", dev, err)
	}
	bucket := filepath.Join(dir, "bucket")
	if err := os.Mkdir(bucket, 0o755); err != nil {
		t.Fatal(err)
	}
	target := filepath.Join(bucket, "dev.qcow2")
	res := runCLI(t, cliRun{args: []string{"export", dev, fileURL(target), "--cluster-size", "4k"}})
	if res.code != 0 {
		t.Fatalf("export of %s: %s", dev, res)
	}
	if sum := exportSummary(t, res.stdout); sum["raw sha256"] != rawSum {
		t.Errorf("raw sha256 %q, want %q", sum["raw sha256"], rawSum)
	}
	judgeExport(t, target, raw, s.size, 3, "zlib")
	d := runCLI(t, cliRun{args: []string{"digest", dev}})
	if d.code != 0 || !strings.HasPrefix(string(d.stdout), rawSum+" ") {
		t.Errorf("digest of the device: %s", d)
	}
}
