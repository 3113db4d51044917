package e2e

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// This file holds what the `snapfs serve` tests share: a serve process run
// in the background, external tools run under a deadline, references made
// by qemu-img, and a small NBD client written for the tests, which never
// asks for structured replies.

// toolResult is the outcome of one run of an external program.
type toolResult struct {
	cmdline string
	stdout  []byte
	stderr  string
	code    int // exit code; -1 when it could not run or was killed
	err     error
}

func (r *toolResult) String() string {
	return fmt.Sprintf("%s: exit %d (%v)\nstderr:\n%s", r.cmdline, r.code, r.err, tail(r.stderr, 3000))
}

// runTool runs name with args under timeout (the process group is killed
// when it runs out).
func runTool(t *testing.T, timeout time.Duration, name string, args ...string) *toolResult {
	t.Helper()
	return runToolOut(t, timeout, nil, name, args...)
}

// runToolOut is runTool with stdout sent to w instead of being captured
// (when w is not nil).
func runToolOut(t *testing.T, timeout time.Duration, w io.Writer, name string, args ...string) *toolResult {
	t.Helper()
	return runToolIn(t, timeout, "", w, name, args...)
}

// runToolIn is runToolOut in the working directory dir.
func runToolIn(t *testing.T, timeout time.Duration, dir string, w io.Writer, name string, args ...string) *toolResult {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Cancel = func() error { return syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL) }
	cmd.WaitDelay = 5 * time.Second
	cmd.Env = cleanEnv()
	cmd.Dir = dir
	var out bytes.Buffer
	var errb lockedBuffer
	if w != nil {
		cmd.Stdout = w
	} else {
		cmd.Stdout = &out
	}
	cmd.Stderr = &errb
	err := cmd.Run()
	r := &toolResult{cmdline: name + " " + strings.Join(args, " "), stdout: out.Bytes(), stderr: errb.String(), code: -1, err: err}
	if cmd.ProcessState != nil && cmd.ProcessState.Exited() {
		r.code = cmd.ProcessState.ExitCode()
	}
	if ctx.Err() != nil {
		r.err = fmt.Errorf("killed after %v: %w", timeout, ctx.Err())
		r.code = -1
	}
	return r
}

// mustTool runs a tool that must succeed.
func mustTool(t *testing.T, timeout time.Duration, name string, args ...string) []byte {
	t.Helper()
	r := runTool(t, timeout, name, args...)
	if r.code != 0 {
		t.Fatalf("%s", r)
	}
	return r.stdout
}

// serveProc is a `snapfs serve` running in the background, started
// directly (not through the runner: the tests signal it).
type serveProc struct {
	args    []string
	cmd     *exec.Cmd
	stderr  *lockedBuffer
	done    chan struct{}
	state   *os.ProcessState
	addr    string   // the TCP address it listens on, if any
	socket  string   // the unix socket it listens on, if any
	exports []string // the export names of the "serving" line
}

var servingLine = regexp.MustCompile(`(?m)^snapfs: serving (.*) on nbd://(\S+) \((tcp|unix)\)$`)

// startServe starts `snapfs serve args...` with env added to the
// environment and waits (60 s at most) until it says it serves on each of
// its listeners. When the test ends the server is sent SIGTERM, and must
// exit 0 within 15 s (it is killed otherwise).
func startServe(t *testing.T, env []string, args ...string) *serveProc {
	t.Helper()
	return startServing(t, env, "serve", args...)
}

// startServing is startServe for any command that serves NBD (serve,
// import --serve nbd).
func startServing(t *testing.T, env []string, command string, args ...string) *serveProc {
	t.Helper()
	p := &serveProc{args: args, stderr: &lockedBuffer{}, done: make(chan struct{})}
	cmd := exec.Command(snapfsBin, append([]string{command}, args...)...)
	cmd.Env = append(cleanEnv(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	cmd.Stderr = p.stderr
	p.cmd = cmd
	if err := cmd.Start(); err != nil {
		t.Fatalf("start snapfs serve: %v", err)
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
				if p.state.ExitCode() != 0 {
					t.Errorf("snapfs serve exits %v on SIGTERM, want 0:\n%s", p.state, tail(p.stderr.String(), 3000))
				}
			case <-time.After(15 * time.Second):
				syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				<-p.done
				t.Errorf("snapfs serve still running 15s after SIGTERM (killed):\n%s", tail(p.stderr.String(), 3000))
			}
		}
		p.checkNoCrash(t)
	})

	hasSocket, hasListen := false, false
	for _, a := range args {
		switch {
		case a == "--socket" || strings.HasPrefix(a, "--socket="):
			hasSocket = true
		case a == "--listen" || strings.HasPrefix(a, "--listen="):
			hasListen = true
		}
	}
	want := 0
	if hasSocket {
		want++
	}
	if !hasSocket || hasListen {
		want++
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if m := servingLine.FindAllStringSubmatch(p.stderr.String(), -1); len(m) >= want {
			for _, l := range m {
				if l[3] == "tcp" {
					p.addr = l[2]
				} else {
					p.socket = l[2]
				}
			}
			for _, q := range strings.Split(m[0][1], ", ") {
				name, err := strconv.Unquote(q)
				if err != nil {
					t.Fatalf("serving line: export name %s: %v", q, err)
				}
				p.exports = append(p.exports, name)
			}
			return p
		}
		select {
		case <-p.done:
			t.Fatalf("snapfs serve %s exited (%v) before serving:\n%s", strings.Join(args, " "), p.state, p.stderr)
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("snapfs serve %s: not serving after 60s:\n%s", strings.Join(args, " "), p.stderr)
		}
	}
}

func (p *serveProc) running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

func (p *serveProc) checkNoCrash(t *testing.T) {
	t.Helper()
	if s := p.stderr.String(); strings.Contains(s, "panic:") || strings.Contains(s, "goroutine ") {
		t.Errorf("snapfs serve crashed:\n%s", tail(s, 6000))
	}
}

// uri is the NBD URI of an export over TCP.
func (p *serveProc) uri(name string) string { return "nbd://" + p.addr + "/" + name }

// signal sends sig and waits (d at most) for the exit code.
func (p *serveProc) signal(t *testing.T, sig syscall.Signal, d time.Duration) int {
	t.Helper()
	p.cmd.Process.Signal(sig)
	select {
	case <-p.done:
		return p.state.ExitCode()
	case <-time.After(d):
		t.Fatalf("snapfs serve still running %v after %v:\n%s", d, sig, p.stderr)
	}
	return -1
}

// serveRef is what qemu-img says about an image, kept as a raw file.
type serveRef struct {
	raw     string // qemu-img convert -O raw
	sha256  string
	size    int64
	mapping []mapEntry // qemu-img map --output=json
	data    *os.File   // raw, open for ReadAt
}

var (
	serveRefMu sync.Mutex
	serveRefs  = map[string]*serveRefOnce{}
)

type serveRefOnce struct {
	once sync.Once
	r    *serveRef
	err  error
}

// rawRef makes (once per image) the raw reference of dir/key, in workDir
// (shared by the tests, so outside any test's temp dir).
func rawRef(t *testing.T, dir, key string) *serveRef {
	t.Helper()
	r, err := rawRefErr(t, dir, key)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// rawRefErr is rawRef for goroutines other than the test's.
func rawRefErr(t *testing.T, dir, key string) (*serveRef, error) {
	t.Helper()
	path := filepath.Join(dir, key)
	serveRefMu.Lock()
	e := serveRefs[path]
	if e == nil {
		e = &serveRefOnce{}
		serveRefs[path] = e
	}
	serveRefMu.Unlock()
	e.once.Do(func() { e.r, e.err = makeRawRef(t, dir, key) })
	return e.r, e.err
}

func makeRawRef(t *testing.T, dir, key string) (*serveRef, error) {
	t.Helper()
	rawDir, err := os.MkdirTemp(workDir, "raw-")
	if err != nil {
		return nil, err
	}
	raw := filepath.Join(rawDir, filepath.Base(key)+".raw")
	// From dir: QEMU resolves a data file's name against the working
	// directory.
	if res := runToolIn(t, 2*time.Minute, dir, nil, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", key, raw); res.code != 0 {
		return nil, errors.New(res.String())
	}
	r := &serveRef{raw: raw}
	if r.data, err = os.Open(raw); err != nil {
		return nil, err
	}
	h := sha256.New()
	if r.size, err = io.Copy(h, r.data); err != nil {
		return nil, err
	}
	r.sha256 = hex.EncodeToString(h.Sum(nil))
	res := runToolIn(t, time.Minute, dir, nil, "qemu-img", "map", "-f", "qcow2", "--output=json", key)
	if res.code != 0 {
		return nil, errors.New(res.String())
	}
	if err := json.Unmarshal(res.stdout, &r.mapping); err != nil {
		return nil, fmt.Errorf("qemu-img map %s: %v", key, err)
	}
	return r, nil
}

// bytes returns n bytes of the raw image at off.
func (r *serveRef) bytes(t *testing.T, off, n int64) []byte {
	t.Helper()
	b := make([]byte, n)
	if _, err := r.data.ReadAt(b, off); err != nil {
		t.Errorf("reading %s at %d: %v", r.raw, off, err)
	}
	return b
}

// firstDiff describes where got and want first differ.
func firstDiff(got, want []byte) string {
	if len(got) != len(want) {
		return fmt.Sprintf("%d bytes, want %d", len(got), len(want))
	}
	for i := range got {
		if got[i] != want[i] {
			return fmt.Sprintf("byte %d is %#02x, want %#02x", i, got[i], want[i])
		}
	}
	return ""
}

// qemuIORead is one `read -v OFF LEN` of qemu-io.
type qemuIORead struct{ off, n int64 }

// qemuIOReads reads ranges of an NBD URI with one qemu-io run and returns
// what each read gave (nil for a failed read), and qemu-io's output.
func qemuIOReads(t *testing.T, uri string, reads []qemuIORead) ([][]byte, *toolResult) {
	t.Helper()
	args := []string{"-r", "-f", "raw"}
	for _, r := range reads {
		args = append(args, "-c", fmt.Sprintf("read -v %d %d", r.off, r.n))
	}
	res := runTool(t, time.Minute, "qemu-io", append(args, uri)...)
	if res.code == -1 {
		t.Fatalf("%s", res)
	}
	return parseQemuIO(string(res.stdout), reads), res
}

var qemuIODone = regexp.MustCompile(`^read (\d+)/(\d+) bytes at offset (\d+)$`)

// parseQemuIO parses the hex dumps of `read -v` (qemu-io's dump_buffer:
// "%08x:  " then "%02x " per byte, 16 a line, then " " and the text),
// each followed by "read N/N bytes at offset OFF" when the read worked (a
// failed read prints only to stderr). It returns what each read gave, nil
// for those without a complete dump.
func parseQemuIO(out string, reads []qemuIORead) [][]byte {
	type dump struct {
		off  int64
		data []byte
		used bool
	}
	var dumps []*dump
	var cur *dump
	for _, line := range strings.Split(out, "\n") {
		if m := qemuIODone.FindStringSubmatch(line); m != nil {
			if cur != nil && m[3] == strconv.FormatInt(cur.off, 10) && m[1] == strconv.Itoa(len(cur.data)) {
				dumps = append(dumps, cur)
			}
			cur = nil
			continue
		}
		addr, rest, found := strings.Cut(line, ":  ")
		a, err := strconv.ParseInt(addr, 16, 64)
		if !found || err != nil {
			continue
		}
		if cur == nil || a != cur.off+int64(len(cur.data)) {
			cur = &dump{off: a}
		}
		for j := 0; j < 16 && 3*j+3 <= len(rest) && rest[3*j+2] == ' '; j++ {
			v, err := strconv.ParseUint(rest[3*j:3*j+2], 16, 8)
			if err != nil {
				break
			}
			cur.data = append(cur.data, byte(v))
		}
	}
	got := make([][]byte, len(reads))
	for k, r := range reads {
		for _, d := range dumps {
			if !d.used && d.off == r.off && int64(len(d.data)) == r.n {
				d.used = true
				got[k] = d.data
				break
			}
		}
	}
	return got
}

// nbdinfoMap is one extent of `nbdinfo --map --json`.
type nbdinfoMap struct {
	Offset      int64  `json:"offset"`
	Length      int64  `json:"length"`
	Type        int    `json:"type"`
	Description string `json:"description"`
}

// fioResult is the part of fio's JSON output the tests check.
type fioResult struct {
	Jobs []struct {
		Name  string `json:"jobname"`
		Error int    `json:"error"`
		Read  struct {
			IOBytes  int64 `json:"io_bytes"`
			TotalIOs int64 `json:"total_ios"`
			ShortIOs int64 `json:"short_ios"`
			DropIOs  int64 `json:"drop_ios"`
		} `json:"read"`
	} `json:"jobs"`
}

// The NBD protocol, as much as a client needs (NetworkBlockDevice/nbd
// doc/proto.md).
const (
	nbdcMagic        = 0x4e42444d41474943 // "NBDMAGIC"
	nbdcOptMagic     = 0x49484156454f5054 // "IHAVEOPT"
	nbdcRepMagic     = 0x0003e889045565a9
	nbdcReqMagic     = 0x25609513
	nbdcSimpleMagic  = 0x67446698
	nbdcStructMagic  = 0x668e33ef
	nbdcOptExport    = 1
	nbdcOptGo        = 7
	nbdcRepAck       = 1
	nbdcRepInfo      = 3
	nbdcRepErrUnknwn = 1<<31 | 6
	nbdcCmdRead      = 0
	nbdcCmdDisc      = 2
	nbdcFlagReadOnly = 1 << 1
)

// nbdHello is how the test client picks its export.
type nbdHello int

const (
	// helloGo: NBD_OPT_GO with NBD_FLAG_C_NO_ZEROES, and no
	// NBD_OPT_STRUCTURED_REPLY before it.
	helloGo nbdHello = iota
	// helloExportName: the old NBD_OPT_EXPORT_NAME, without
	// NBD_FLAG_C_NO_ZEROES (so the server sends 124 zero bytes).
	helloExportName
)

func (h nbdHello) String() string { return [...]string{"OPT_GO", "OPT_EXPORT_NAME"}[h] }

// nbdOptError is an error reply to an option.
type nbdOptError struct {
	typ uint32
	msg string
}

func (e *nbdOptError) Error() string {
	return fmt.Sprintf("option refused: reply type %#x: %q", e.typ, e.msg)
}

// nbdClient is a minimal NBD client: fixed newstyle negotiation, no
// structured replies, so every reply must be a simple one.
type nbdClient struct {
	conn   net.Conn
	br     *bufio.Reader
	size   int64
	flags  uint16
	handle uint64
}

// nbdDial connects to network/addr and negotiates the export. Every I/O on
// the connection must be done by deadline.
func nbdDial(network, addr, export string, hello nbdHello, deadline time.Time) (*nbdClient, error) {
	nc, err := net.DialTimeout(network, addr, 10*time.Second)
	if err != nil {
		return nil, err
	}
	nc.SetDeadline(deadline)
	c := &nbdClient{conn: nc, br: bufio.NewReader(nc)}
	if err := c.negotiate(export, hello); err != nil {
		nc.Close()
		return nil, err
	}
	return c, nil
}

var nbdBE = binary.BigEndian

func (c *nbdClient) negotiate(export string, hello nbdHello) error {
	var g [18]byte
	if _, err := io.ReadFull(c.br, g[:]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if nbdBE.Uint64(g[0:]) != nbdcMagic || nbdBE.Uint64(g[8:]) != nbdcOptMagic {
		return fmt.Errorf("greeting: not a newstyle NBD server: % x", g)
	}
	hflags := nbdBE.Uint16(g[16:])
	if hflags&1 == 0 {
		return fmt.Errorf("server does not offer fixed newstyle (flags %#x)", hflags)
	}
	cflags := uint32(1) // NBD_FLAG_C_FIXED_NEWSTYLE
	if hello == helloGo && hflags&2 != 0 {
		cflags |= 2 // NBD_FLAG_C_NO_ZEROES
	}
	if err := binary.Write(c.conn, nbdBE, cflags); err != nil {
		return err
	}
	if hello == helloExportName {
		if err := c.sendOpt(nbdcOptExport, []byte(export)); err != nil {
			return err
		}
		var b [8 + 2 + 124]byte
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return fmt.Errorf("NBD_OPT_EXPORT_NAME %q: %w", export, err)
		}
		c.size, c.flags = int64(nbdBE.Uint64(b[0:])), nbdBE.Uint16(b[8:])
		if !bytes.Equal(b[10:], make([]byte, 124)) {
			return fmt.Errorf("NBD_OPT_EXPORT_NAME: the 124 bytes after the flags are not zero")
		}
		return nil
	}
	data := nbdBE.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = nbdBE.AppendUint16(data, 0) // no information requests
	if err := c.sendOpt(nbdcOptGo, data); err != nil {
		return err
	}
	gotInfo := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return fmt.Errorf("NBD_OPT_GO reply: %w", err)
		}
		if nbdBE.Uint64(h[0:]) != nbdcRepMagic || nbdBE.Uint32(h[8:]) != nbdcOptGo {
			return fmt.Errorf("NBD_OPT_GO: bad reply header % x", h)
		}
		typ, n := nbdBE.Uint32(h[12:]), nbdBE.Uint32(h[16:])
		if n > 64<<10 {
			return fmt.Errorf("NBD_OPT_GO: reply of %d bytes", n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(c.br, body); err != nil {
			return err
		}
		switch {
		case typ&(1<<31) != 0:
			return &nbdOptError{typ: typ, msg: string(body)}
		case typ == nbdcRepInfo:
			if len(body) >= 12 && nbdBE.Uint16(body) == 0 { // NBD_INFO_EXPORT
				c.size, c.flags = int64(nbdBE.Uint64(body[2:])), nbdBE.Uint16(body[10:])
				gotInfo = true
			}
		case typ == nbdcRepAck:
			if !gotInfo {
				return errors.New("NBD_OPT_GO: acknowledged without NBD_INFO_EXPORT")
			}
			return nil
		default:
			return fmt.Errorf("NBD_OPT_GO: unexpected reply type %#x", typ)
		}
	}
}

func (c *nbdClient) sendOpt(opt uint32, data []byte) error {
	b := nbdBE.AppendUint64(nil, nbdcOptMagic)
	b = nbdBE.AppendUint32(b, opt)
	b = nbdBE.AppendUint32(b, uint32(len(data)))
	_, err := c.conn.Write(append(b, data...))
	return err
}

func (c *nbdClient) sendReq(typ uint16, handle uint64, off int64, n uint32) error {
	var b [28]byte
	nbdBE.PutUint32(b[0:], nbdcReqMagic)
	nbdBE.PutUint16(b[4:], 0)
	nbdBE.PutUint16(b[6:], typ)
	nbdBE.PutUint64(b[8:], handle)
	nbdBE.PutUint64(b[16:], uint64(off))
	nbdBE.PutUint32(b[24:], n)
	_, err := c.conn.Write(b[:])
	return err
}

// nbdRead is one read request and its outcome.
type nbdRead struct {
	off   int64
	buf   []byte // len(buf) bytes are read
	errno uint32 // the reply's error, 0 on success
	done  bool
}

// readAll sends the reads, at most depth in flight, and collects their
// simple replies, which may come in any order.
func (c *nbdClient) readAll(reads []*nbdRead, depth int) error {
	base := c.handle + 1
	c.handle += uint64(len(reads))
	slots := make(chan struct{}, depth)
	werr := make(chan error, 1)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		for i, r := range reads {
			select {
			case slots <- struct{}{}:
			case <-stop:
				werr <- nil
				return
			}
			if err := c.sendReq(nbdcCmdRead, base+uint64(i), r.off, uint32(len(r.buf))); err != nil {
				werr <- err
				c.conn.Close()
				return
			}
		}
		werr <- nil
	}()
	for range reads {
		var h [16]byte
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			return fmt.Errorf("reading a reply: %w", err)
		}
		switch m := nbdBE.Uint32(h[0:]); m {
		case nbdcSimpleMagic:
		case nbdcStructMagic:
			return errors.New("got a structured reply, though the client did not ask for structured replies")
		default:
			return fmt.Errorf("bad reply magic %#x", m)
		}
		handle := nbdBE.Uint64(h[8:])
		if handle < base || handle >= base+uint64(len(reads)) {
			return fmt.Errorf("reply for unknown handle %d", handle)
		}
		r := reads[handle-base]
		if r.done {
			return fmt.Errorf("second reply for handle %d", handle)
		}
		r.done = true
		r.errno = nbdBE.Uint32(h[4:])
		if r.errno == 0 {
			if _, err := io.ReadFull(c.br, r.buf); err != nil {
				return fmt.Errorf("reading %d bytes of data: %w", len(r.buf), err)
			}
		}
		<-slots
	}
	return <-werr
}

// read reads one range.
func (c *nbdClient) read(off int64, n int) ([]byte, uint32, error) {
	r := &nbdRead{off: off, buf: make([]byte, n)}
	err := c.readAll([]*nbdRead{r}, 1)
	return r.buf, r.errno, err
}

// close sends NBD_CMD_DISC and closes the connection.
func (c *nbdClient) close() {
	c.sendReq(nbdcCmdDisc, 0, 0, 0)
	c.conn.Close()
}

// randomReads returns n reads of r's image at odd offsets and lengths
// (1 byte to 160 KiB), half of them starting in what qemu-img map calls
// data, plus the first and last bytes and a few reads across cluster
// boundaries, from seed.
func randomReads(r *serveRef, n int, seed uint64) []*nbdRead {
	size := r.size
	var out []*nbdRead
	add := func(off, n int64) {
		off = max(0, min(off, size-1))
		n = max(1, min(n, size-off))
		out = append(out, &nbdRead{off: off, buf: make([]byte, n)})
	}
	add(0, 1)
	add(size-1, 1)
	add(size-4097, 4097)
	add(65535, 3)
	add(2<<20-7, 64<<10+13)
	var data []mapEntry
	for _, e := range r.mapping {
		if e.Data && !e.Zero {
			data = append(data, e)
		}
	}
	x := seed*0x9e3779b97f4a7c15 | 1
	next := func() uint64 { // xorshift
		x ^= x << 13
		x ^= x >> 7
		x ^= x << 17
		return x
	}
	for k := range n {
		off := int64(next() % uint64(size))
		if k%2 == 0 && len(data) > 0 {
			e := data[next()%uint64(len(data))]
			off = e.Start + int64(next()%uint64(e.Length))
		}
		var ln int64
		switch next() % 4 {
		case 0:
			ln = int64(next()%512) + 1
		case 1:
			ln = 4096
			off &^= 4095
		case 2:
			ln = int64(next()%(160<<10)) + 1
		default:
			ln = int64(next()%(64<<10)) + 1
		}
		add(off, ln)
	}
	return slices.Clip(out)
}

// writeTLSFiles makes a CA and a server certificate for 127.0.0.1 signed by
// it, in dir: ca-cert.pem (where libnbd's tls-certificates looks), and
// server-cert.pem and server-key.pem for serve.
func writeTLSFiles(t *testing.T, dir string) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	ca := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "snapfs test CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, ca, ca, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srv := &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "127.0.0.1"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(24 * time.Hour),
		IPAddresses:  []net.IP{net.ParseIP("127.0.0.1")},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}
	srvDER, err := x509.CreateCertificate(rand.Reader, srv, ca, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	keyDER, err := x509.MarshalECPrivateKey(srvKey)
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string]*pem.Block{
		"ca-cert.pem":     {Type: "CERTIFICATE", Bytes: caDER},
		"server-cert.pem": {Type: "CERTIFICATE", Bytes: srvDER},
		"server-key.pem":  {Type: "EC PRIVATE KEY", Bytes: keyDER},
	} {
		if err := os.WriteFile(filepath.Join(dir, name), pem.EncodeToMemory(b), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

var metricsLine = regexp.MustCompile(`(?m)^snapfs: metrics on (http://\S+/metrics)$`)

// metricsURL is the /metrics URL serve printed for --metrics.
func (p *serveProc) metricsURL(t *testing.T) string {
	t.Helper()
	m := metricsLine.FindStringSubmatch(p.stderr.String())
	if m == nil {
		t.Fatalf("serve did not say where its metrics are:\n%s", p.stderr)
	}
	return m[1]
}

// scrapeMetrics returns the unlabelled samples of a Prometheus text page.
func scrapeMetrics(t *testing.T, url string) map[string]float64 {
	t.Helper()
	b := httpGet(t, url)
	out := map[string]float64{}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) != 2 || strings.HasPrefix(line, "#") || strings.Contains(f[0], "{") {
			continue
		}
		if v, err := strconv.ParseFloat(f[1], 64); err == nil {
			out[f[0]] = v
		}
	}
	return out
}

// checkProfiler checks that the metrics endpoint at base also serves Go's
// profiler: the goroutine dump names the NBD server's accept loop.
func checkProfiler(t *testing.T, base string) {
	t.Helper()
	url := base + "/debug/pprof/goroutine?debug=1"
	b := httpGet(t, url)
	if !strings.Contains(string(b), "goroutine profile:") || !strings.Contains(string(b), "snapfs/nbd.") {
		t.Errorf("GET %s: not a goroutine profile naming the nbd package:\n%.2000s", url, b)
	}
}

// httpGet returns the body of a GET of url, failing the test unless it
// answers 200 within 10 s.
func httpGet(t *testing.T, url string) []byte {
	t.Helper()
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get(url)
	if err != nil {
		t.Fatalf("GET %s: %v", url, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s, %v", url, resp.Status, err)
	}
	return b
}
