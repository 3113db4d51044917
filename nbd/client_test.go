package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
)

// A minimal NBD client for the tests: it negotiates what it is told to and
// parses replies strictly, so that it doubles as a protocol checker.

type clientOpts struct {
	name       string
	structured bool
	meta       bool // SET_META_CONTEXT base:allocation (needs structured)
	exportName bool // NBD_OPT_EXPORT_NAME instead of NBD_OPT_GO
	noZeroes   bool
	tls        *tls.Config // STARTTLS first when set
}

type testClient struct {
	t    testing.TB
	conn net.Conn
	br   *bufio.Reader
	bw   *bufio.Writer

	structured bool
	metaID     uint32
	size       uint64
	flags      uint16

	wmu     sync.Mutex // serializes send
	mu      sync.Mutex
	pending map[uint64]pendingReq // for simple read replies
	partial map[uint64]*reply
}

type pendingReq struct {
	typ    uint16
	off    uint64
	length uint32
}

type reply struct {
	handle  uint64
	errno   uint32
	msg     string
	data    []byte // READ: the assembled range (holes zero-filled)
	chunks  []chunk
	extents [][2]uint32 // BLOCK_STATUS: length, flags
	metaID  uint32
}

type chunk struct {
	flags, typ uint16
	off        uint64
	n          uint64
}

func (r *reply) holeBytes() (n uint64) {
	for _, c := range r.chunks {
		if c.typ == replyTypeOffsetHole {
			n += c.n
		}
	}
	return n
}

// rawConn dials and returns the bare connection.
func rawConn(t testing.TB, addr string) net.Conn {
	t.Helper()
	network := "tcp"
	if filepath.IsAbs(addr) {
		network = "unix"
	}
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	c.SetDeadline(time.Now().Add(60 * time.Second))
	t.Cleanup(func() { c.Close() })
	return c
}

func newTestClient(t testing.TB, c net.Conn) *testClient {
	return &testClient{
		t: t, conn: c,
		br:      bufio.NewReader(c),
		bw:      bufio.NewWriter(c),
		pending: map[uint64]pendingReq{},
		partial: map[uint64]*reply{},
	}
}

// dialClient connects and negotiates per o, failing the test on error.
func dialClient(t testing.TB, addr string, o clientOpts) *testClient {
	t.Helper()
	c, err := tryClient(t, addr, o)
	if err != nil {
		t.Fatalf("negotiate with %s: %v", addr, err)
	}
	return c
}

func tryClient(t testing.TB, addr string, o clientOpts) (*testClient, error) {
	c := newTestClient(t, rawConn(t, addr))
	if err := c.greet(o.noZeroes); err != nil {
		return nil, err
	}
	if o.tls != nil {
		if err := c.startTLS(o.tls); err != nil {
			return nil, err
		}
	}
	if o.structured {
		typ, _, err := c.option(optStructuredReply, nil)
		if err != nil {
			return nil, err
		}
		if typ != repAck {
			return nil, fmt.Errorf("STRUCTURED_REPLY: reply %#x", typ)
		}
		c.structured = true
	}
	if o.meta {
		reps, err := c.metaContext(optSetMetaContext, o.name, baseAllocation)
		if err != nil {
			return nil, err
		}
		if len(reps) != 1 {
			return nil, fmt.Errorf("SET_META_CONTEXT: %d contexts", len(reps))
		}
		c.metaID = reps[0].id
	}
	if o.exportName {
		c.sendOption(optExportName, []byte(o.name))
		var b [10]byte
		if _, err := io.ReadFull(c.br, b[:]); err != nil {
			return nil, fmt.Errorf("EXPORT_NAME reply: %w", err)
		}
		c.size = be.Uint64(b[0:])
		c.flags = be.Uint16(b[8:])
		if !o.noZeroes {
			var z [124]byte
			if _, err := io.ReadFull(c.br, z[:]); err != nil {
				return nil, fmt.Errorf("EXPORT_NAME zeroes: %w", err)
			}
			if z != [124]byte{} {
				return nil, fmt.Errorf("EXPORT_NAME: padding not zero")
			}
		}
		return c, nil
	}
	info, err := c.infoGo(optGo, o.name, infoName, infoDescription, infoBlockSize)
	if err != nil {
		return nil, err
	}
	if info.typ != repAck {
		return nil, fmt.Errorf("GO %q: reply %#x (%s)", o.name, info.typ, info.msg)
	}
	c.size, c.flags = info.size, info.flags
	return c, nil
}

func (c *testClient) greet(noZeroes bool) error {
	var g [18]byte
	if _, err := io.ReadFull(c.br, g[:]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if be.Uint64(g[0:]) != magicNBD || be.Uint64(g[8:]) != magicOpt {
		return fmt.Errorf("greeting: bad magic % x", g[:16])
	}
	if hf := be.Uint16(g[16:]); hf != flagFixedNewstyle|flagNoZeroes {
		return fmt.Errorf("handshake flags %#x", hf)
	}
	cf := uint32(flagCFixedNewstyle)
	if noZeroes {
		cf |= flagCNoZeroes
	}
	var b [4]byte
	be.PutUint32(b[:], cf)
	c.bw.Write(b[:])
	return c.bw.Flush()
}

func (c *testClient) sendOption(opt uint32, data []byte) {
	var h [16]byte
	be.PutUint64(h[0:], magicOpt)
	be.PutUint32(h[8:], opt)
	be.PutUint32(h[12:], uint32(len(data)))
	c.bw.Write(h[:])
	c.bw.Write(data)
	if err := c.bw.Flush(); err != nil {
		c.t.Fatalf("send option %d: %v", opt, err)
	}
}

// optReply reads one option reply to opt.
func (c *testClient) optReply(opt uint32) (typ uint32, data []byte, err error) {
	var h [20]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return 0, nil, fmt.Errorf("option %d reply: %w", opt, err)
	}
	if m := be.Uint64(h[0:]); m != magicOptReply {
		return 0, nil, fmt.Errorf("option reply magic %#x", m)
	}
	if o := be.Uint32(h[8:]); o != opt {
		return 0, nil, fmt.Errorf("reply to option %d, want %d", o, opt)
	}
	typ = be.Uint32(h[12:])
	n := be.Uint32(h[16:])
	if n > 1<<20 {
		return 0, nil, fmt.Errorf("option reply length %d", n)
	}
	data = make([]byte, n)
	if _, err := io.ReadFull(c.br, data); err != nil {
		return 0, nil, err
	}
	return typ, data, nil
}

// option sends an option with a single reply expected.
func (c *testClient) option(opt uint32, data []byte) (uint32, []byte, error) {
	c.sendOption(opt, data)
	return c.optReply(opt)
}

func (c *testClient) startTLS(cfg *tls.Config) error {
	typ, msg, err := c.option(optStartTLS, nil)
	if err != nil {
		return err
	}
	if typ != repAck {
		return fmt.Errorf("STARTTLS: reply %#x %q", typ, msg)
	}
	tc := tls.Client(c.conn, cfg)
	if err := tc.Handshake(); err != nil {
		return fmt.Errorf("TLS handshake: %w", err)
	}
	c.conn = tc
	c.br = bufio.NewReader(tc)
	c.bw = bufio.NewWriter(tc)
	return nil
}

type infoResult struct {
	typ               uint32 // final reply type
	msg               string
	size              uint64
	flags             uint16
	name, desc        string
	gotName           bool
	minB, prefB, maxB uint32
}

func (c *testClient) infoGo(opt uint32, name string, reqs ...uint16) (infoResult, error) {
	b := make([]byte, 4, 4+len(name)+2+2*len(reqs))
	be.PutUint32(b, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint16(b, uint16(len(reqs)))
	for _, r := range reqs {
		b = be.AppendUint16(b, r)
	}
	c.sendOption(opt, b)
	var res infoResult
	gotExport := false
	for {
		typ, data, err := c.optReply(opt)
		if err != nil {
			return res, err
		}
		if typ != repInfo {
			res.typ = typ
			res.msg = string(data)
			if typ == repAck && !gotExport {
				return res, fmt.Errorf("ACK without NBD_INFO_EXPORT")
			}
			return res, nil
		}
		if len(data) < 2 {
			return res, fmt.Errorf("short NBD_REP_INFO")
		}
		switch it := be.Uint16(data); it {
		case infoExport:
			if len(data) != 12 {
				return res, fmt.Errorf("NBD_INFO_EXPORT length %d", len(data))
			}
			res.size = be.Uint64(data[2:])
			res.flags = be.Uint16(data[10:])
			gotExport = true
		case infoName:
			res.name = string(data[2:])
			res.gotName = true
		case infoDescription:
			res.desc = string(data[2:])
		case infoBlockSize:
			if len(data) != 14 {
				return res, fmt.Errorf("NBD_INFO_BLOCK_SIZE length %d", len(data))
			}
			res.minB, res.prefB, res.maxB = be.Uint32(data[2:]), be.Uint32(data[6:]), be.Uint32(data[10:])
		default:
			return res, fmt.Errorf("unknown info type %d", it)
		}
	}
}

type metaRep struct {
	id   uint32
	name string
}

func metaRequest(name string, queries ...string) []byte {
	b := be.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = be.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = be.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// metaContext sends LIST or SET_META_CONTEXT and collects the contexts.
func (c *testClient) metaContext(opt uint32, name string, queries ...string) ([]metaRep, error) {
	c.sendOption(opt, metaRequest(name, queries...))
	var out []metaRep
	for {
		typ, data, err := c.optReply(opt)
		if err != nil {
			return nil, err
		}
		switch typ {
		case repMetaContext:
			if len(data) < 4 {
				return nil, fmt.Errorf("short NBD_REP_META_CONTEXT")
			}
			out = append(out, metaRep{be.Uint32(data), string(data[4:])})
		case repAck:
			return out, nil
		default:
			return out, fmt.Errorf("meta context reply %#x %q", typ, data)
		}
	}
}

// send writes one request (and its payload) without waiting.
func (c *testClient) send(typ, flags uint16, handle, off uint64, length uint32, payload []byte) {
	c.mu.Lock()
	c.pending[handle] = pendingReq{typ, off, length}
	c.mu.Unlock()
	var h [28]byte
	be.PutUint32(h[0:], magicRequest)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], handle)
	be.PutUint64(h[16:], off)
	be.PutUint32(h[24:], length)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.bw.Write(h[:])
	c.bw.Write(payload)
	if err := c.bw.Flush(); err != nil {
		c.t.Errorf("send request: %v", err)
	}
}

// next reads replies until one is complete.
func (c *testClient) next() (*reply, error) {
	for {
		var m [4]byte
		if _, err := io.ReadFull(c.br, m[:]); err != nil {
			return nil, err
		}
		switch be.Uint32(m[:]) {
		case magicSimpleReply:
			var h [12]byte
			if _, err := io.ReadFull(c.br, h[:]); err != nil {
				return nil, err
			}
			r := &reply{errno: be.Uint32(h[0:]), handle: be.Uint64(h[4:])}
			c.mu.Lock()
			p, ok := c.pending[r.handle]
			delete(c.pending, r.handle)
			c.mu.Unlock()
			if !ok {
				return nil, fmt.Errorf("simple reply for unknown handle %d", r.handle)
			}
			if p.typ == cmdRead && c.structured {
				return nil, fmt.Errorf("simple reply to a READ with structured replies")
			}
			if p.typ == cmdRead && r.errno == 0 {
				r.data = make([]byte, p.length)
				if _, err := io.ReadFull(c.br, r.data); err != nil {
					return nil, err
				}
			}
			return r, nil
		case magicStructuredRepl:
			if !c.structured {
				return nil, fmt.Errorf("structured reply not negotiated")
			}
			r, done, err := c.chunk()
			if err != nil {
				return nil, err
			}
			if done {
				return r, nil
			}
		default:
			return nil, fmt.Errorf("bad reply magic % x", m)
		}
	}
}

func (c *testClient) chunk() (*reply, bool, error) {
	var h [16]byte
	if _, err := io.ReadFull(c.br, h[:]); err != nil {
		return nil, false, err
	}
	flags, typ := be.Uint16(h[0:]), be.Uint16(h[2:])
	handle, n := be.Uint64(h[4:]), be.Uint32(h[12:])
	c.mu.Lock()
	p, ok := c.pending[handle]
	r := c.partial[handle]
	if r == nil {
		r = &reply{handle: handle}
		c.partial[handle] = r
	}
	c.mu.Unlock()
	if !ok {
		return nil, false, fmt.Errorf("chunk for unknown handle %d", handle)
	}
	if n > 64<<20 {
		return nil, false, fmt.Errorf("chunk length %d", n)
	}
	payload := make([]byte, n)
	if _, err := io.ReadFull(c.br, payload); err != nil {
		return nil, false, err
	}
	ch := chunk{flags: flags, typ: typ}
	switch typ {
	case replyTypeNone:
		if n != 0 || flags&replyFlagDone == 0 {
			return nil, false, fmt.Errorf("bad NONE chunk")
		}
	case replyTypeOffsetData:
		if n < 9 || p.typ != cmdRead {
			return nil, false, fmt.Errorf("bad OFFSET_DATA chunk (len %d)", n)
		}
		ch.off, ch.n = be.Uint64(payload), uint64(n-8)
		if ch.off < p.off || ch.off+ch.n > p.off+uint64(p.length) {
			return nil, false, fmt.Errorf("data chunk [%d,+%d) outside request [%d,+%d)", ch.off, ch.n, p.off, p.length)
		}
		if r.data == nil {
			r.data = make([]byte, p.length)
		}
		copy(r.data[ch.off-p.off:], payload[8:])
	case replyTypeOffsetHole:
		if n != 12 || p.typ != cmdRead {
			return nil, false, fmt.Errorf("bad OFFSET_HOLE chunk")
		}
		ch.off, ch.n = be.Uint64(payload), uint64(be.Uint32(payload[8:]))
		if ch.n == 0 || ch.off < p.off || ch.off+ch.n > p.off+uint64(p.length) {
			return nil, false, fmt.Errorf("hole chunk [%d,+%d) outside request", ch.off, ch.n)
		}
	case replyTypeBlockStatus:
		if n < 12 || (n-4)%8 != 0 || p.typ != cmdBlockStatus {
			return nil, false, fmt.Errorf("bad BLOCK_STATUS chunk (len %d)", n)
		}
		r.metaID = be.Uint32(payload)
		var sum uint64
		for i := 4; i < int(n); i += 8 {
			l, f := be.Uint32(payload[i:]), be.Uint32(payload[i+4:])
			if l == 0 {
				return nil, false, fmt.Errorf("zero-length extent")
			}
			sum += uint64(l)
			r.extents = append(r.extents, [2]uint32{l, f})
		}
		if sum > uint64(p.length) {
			return nil, false, fmt.Errorf("extents cover %d > %d", sum, p.length)
		}
	case replyTypeError, replyTypeErrorOffset:
		if n < 6 {
			return nil, false, fmt.Errorf("short error chunk")
		}
		r.errno = be.Uint32(payload)
		ml := be.Uint16(payload[4:])
		if int(ml) > int(n)-6 {
			return nil, false, fmt.Errorf("error message length %d > %d", ml, n-6)
		}
		r.msg = string(payload[6 : 6+ml])
		if r.errno == 0 {
			return nil, false, fmt.Errorf("error chunk with errno 0")
		}
	default:
		return nil, false, fmt.Errorf("unknown chunk type %d", typ)
	}
	r.chunks = append(r.chunks, ch)
	if flags&replyFlagDone == 0 {
		return r, false, nil
	}
	c.mu.Lock()
	delete(c.partial, handle)
	delete(c.pending, handle)
	c.mu.Unlock()
	if p.typ == cmdRead && r.errno == 0 {
		// Content chunks must cover the range exactly once.
		var cov uint64
		for _, ch := range r.chunks {
			cov += ch.n
		}
		if cov != uint64(p.length) {
			return nil, false, fmt.Errorf("read [%d,+%d): chunks cover %d bytes", p.off, p.length, cov)
		}
		if r.data == nil { // all holes, or empty
			r.data = make([]byte, p.length)
		}
	}
	return r, true, nil
}

// do sends one request and waits for its reply.
func (c *testClient) do(typ, flags uint16, off uint64, length uint32, payload []byte) *reply {
	c.t.Helper()
	c.send(typ, flags, 7, off, length, payload)
	r, err := c.next()
	if err != nil {
		c.t.Fatalf("%s [%d,+%d): %v", cmdName(typ), off, length, err)
	}
	if r.handle != 7 {
		c.t.Fatalf("reply handle %d", r.handle)
	}
	return r
}

func (c *testClient) read(off uint64, n uint32) *reply {
	c.t.Helper()
	return c.do(cmdRead, 0, off, n, nil)
}

func (c *testClient) disconnect() {
	c.send(cmdDisc, 0, 0, 0, 0, nil)
	c.conn.Close()
}

// Test servers.

// testLogger sends the server's logs to the test log while the test runs.
func testLogger(t testing.TB) *slog.Logger {
	w := &tlogWriter{t: t}
	t.Cleanup(w.stop)
	level := slog.LevelInfo
	if os.Getenv("NBD_TEST_DEBUG") != "" {
		level = slog.LevelDebug
	}
	return slog.New(slog.NewTextHandler(w, &slog.HandlerOptions{Level: level}))
}

type tlogWriter struct {
	mu   sync.Mutex
	t    testing.TB
	done bool
}

func (w *tlogWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	if !w.done {
		w.t.Log(string(p[:len(p)-1]))
	}
	return len(p), nil
}

func (w *tlogWriter) stop() {
	w.mu.Lock()
	w.done = true
	w.mu.Unlock()
}

// serve starts s on a TCP port of 127.0.0.1 and returns its address;
// the server is shut down when the test ends.
func serve(t testing.TB, s *Server) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return serveOn(t, s, l)
}

// serveUnix starts s on a unix socket and returns its path.
func serveUnix(t testing.TB, s *Server) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "nbd.sock")
	l, err := net.Listen("unix", p)
	if err != nil {
		t.Fatal(err)
	}
	return serveOn(t, s, l)
}

func serveOn(t testing.TB, s *Server, l net.Listener) string {
	if s.Logger == nil {
		s.Logger = testLogger(t)
	}
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if err := s.Shutdown(ctx); err != nil {
			t.Errorf("shutdown: %v", err)
		}
		if err := <-done; err != ErrServerClosed {
			t.Errorf("Serve returned %v", err)
		}
	})
	return l.Addr().String()
}

// newServer makes a server offering dev as "disk" (and more exports).
func newServer(t testing.TB, dev *fakeDevice, more ...Export) *Server {
	exps := append([]Export{{Name: "disk", Description: "a fake disk", Device: dev}}, more...)
	return &Server{Exports: ExportList(exps...), Logger: testLogger(t)}
}
