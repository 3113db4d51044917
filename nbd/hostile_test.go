package nbd

import (
	"bytes"
	"io"
	"math/rand/v2"
	"net"
	"runtime"
	"testing"
	"time"
)

// Hostile clients on raw sockets. After each, the server must still serve
// a well-behaved client, and no goroutines may be left behind.

// header builds a request header.
func header(typ, flags uint16, handle, off uint64, length uint32) []byte {
	var h [28]byte
	be.PutUint32(h[0:], magicRequest)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], handle)
	be.PutUint64(h[16:], off)
	be.PutUint32(h[24:], length)
	return h[:]
}

// expectClosed checks that the server closes c (after sending nothing more
// than a little).
func expectClosed(t *testing.T, c net.Conn, what string) {
	t.Helper()
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := io.Copy(io.Discard, c)
	if err != nil {
		t.Errorf("%s: connection not closed: %v (after %d bytes)", what, err, n)
	}
}

// wellBehaved checks that a normal client gets correct data.
func wellBehaved(t *testing.T, addr string, want []byte) {
	t.Helper()
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true, meta: true})
	defer c.disconnect()
	expectRead(t, c.read(4095, 70000), want[4095:4095+70000], 4095)
	if r := c.do(cmdBlockStatus, 0, 0, 1<<20, nil); r.errno != 0 || len(r.extents) == 0 {
		t.Fatalf("block status: errno %d", r.errno)
	}
}

type hostileCase struct {
	name string
	fn   func(t *testing.T, addr string, want []byte)
}

var hostileCases = []hostileCase{
	{"bad-client-flags", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		io.ReadFull(c.br, make([]byte, 18))
		c.conn.Write([]byte{0, 0, 0, 0x80 | 4})
		expectClosed(t, c.conn, "unknown client flags")
	}},
	{"bad-option-magic", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		c.greet(false)
		c.conn.Write(bytes.Repeat([]byte{0xee}, 16))
		expectClosed(t, c.conn, "bad option magic")
	}},
	{"huge-option-then-leave", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		c.greet(false)
		h := be.AppendUint64(nil, magicOpt)
		h = be.AppendUint32(h, optGo)
		h = be.AppendUint32(h, 0xffffffff)
		c.conn.Write(h)
		c.conn.Write(make([]byte, 1000))
		c.conn.Close()
	}},
	{"huge-export-name", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		c.greet(false)
		h := be.AppendUint64(nil, magicOpt)
		h = be.AppendUint32(h, optExportName)
		h = be.AppendUint32(h, 0xffffffff)
		c.conn.Write(h)
		expectClosed(t, c.conn, "huge EXPORT_NAME")
	}},
	{"unknown-export-name", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		c.greet(false)
		c.sendOption(optExportName, []byte("nope"))
		expectClosed(t, c.conn, "unknown EXPORT_NAME")
	}},
	{"truncated-option", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		c.greet(false)
		c.conn.Write(be.AppendUint64(nil, magicOpt)[:5])
		c.conn.Close()
	}},
	{"meta-context-garbage", func(t *testing.T, addr string, _ []byte) {
		c := newTestClient(t, rawConn(t, addr))
		c.greet(false)
		c.option(optStructuredReply, nil)
		// Query count far beyond the data.
		d := metaRequest("disk")
		be.PutUint32(d[len(d)-4:], 0xffffffff)
		if typ, _, err := c.option(optSetMetaContext, d); err != nil || typ != repErrInvalid {
			t.Errorf("bad query count: %#x %v", typ, err)
		}
		// Query length beyond the data.
		d = append(metaRequest("disk"), 0, 0, 0, 100)
		be.PutUint32(d[len(d)-8:], 1)
		if typ, _, err := c.option(optListMetaContext, d); err != nil || typ != repErrInvalid {
			t.Errorf("bad query length: %#x %v", typ, err)
		}
		c.option(optAbort, nil)
	}},
	{"bad-request-magic", func(t *testing.T, addr string, _ []byte) {
		c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
		h := header(cmdRead, 0, 1, 0, 512)
		h[0] ^= 0xff
		c.conn.Write(h)
		expectClosed(t, c.conn, "bad request magic")
	}},
	{"truncated-header", func(t *testing.T, addr string, _ []byte) {
		c := dialClient(t, addr, clientOpts{name: "disk"})
		c.conn.Write(header(cmdRead, 0, 1, 0, 512)[:13])
		c.conn.Close()
	}},
	{"refused-requests", func(t *testing.T, addr string, want []byte) {
		for _, structured := range []bool{false, true} {
			c := dialClient(t, addr, clientOpts{name: "disk", structured: structured})
			over := uint32(errInval)
			if structured {
				over = errOverflow
			}
			for _, q := range []struct {
				typ, flags uint16
				off        uint64
				n          uint32
				errno      uint32
			}{
				{cmdRead, 0, 0, 0xffffffff, over},
				{cmdRead, 0, 0, defaultMaxRequest + 1, over},
				{cmdRead, 0, 1 << 63, 1, errInval},
				{cmdRead, 0, ^uint64(0), 2, errInval},
				{cmdRead, 0, testSize - 1, 2, errInval},
				{cmdRead, 0, testSize + 1, 0, errInval},
				{cmdCache, 0, testSize, 1, errInval},
				{42, 0, 0, 1, errInval},
				{cmdDisc + 100, 0, 0, 0, errInval},
				{cmdRead, 1 << 9, 0, 1, errInval},        // unknown flag
				{cmdRead, cmdFlagReqOne, 0, 1, errInval}, // flag of another command
				{cmdTrim, cmdFlagNoHole, 0, 1, errInval}, // flags are checked first
				{cmdTrim, 0, 0, 1, errPerm},
				{cmdBlockStatus, 0, 0, 512, errInval}, // no context
				{cmdWriteZeroes, cmdFlagFastZero, 0, 1, errInval},
			} {
				if r := c.do(q.typ, q.flags, q.off, q.n, nil); r.errno != q.errno {
					t.Errorf("structured=%v %s flags %#x [%d,+%d): errno %d, want %d", structured, cmdName(q.typ), q.flags, q.off, q.n, r.errno, q.errno)
				}
			}
			if !structured {
				if r := c.do(cmdRead, cmdFlagDF, 0, 1, nil); r.errno != errInval {
					t.Errorf("DF without structured replies: errno %d", r.errno)
				}
			}
			expectRead(t, c.read(100, 100), want[100:200], 100)
			c.disconnect()
		}
	}},
	{"huge-write-then-leave", func(t *testing.T, addr string, _ []byte) {
		c := dialClient(t, addr, clientOpts{name: "disk"})
		c.conn.Write(header(cmdWrite, 0, 1, 0, 0xffffffff))
		c.conn.Write(make([]byte, 100000))
		c.conn.Close()
	}},
	{"pipelined-1000", func(t *testing.T, addr string, want []byte) {
		c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
		const n = 1000
		rng := rand.New(rand.NewPCG(1, 2))
		offs := make([]uint64, n)
		lens := make([]uint32, n)
		var batch []byte
		for i := range n {
			offs[i] = rng.Uint64N(testSize - 20000)
			lens[i] = uint32(rng.Uint64N(20000))
			batch = append(batch, header(cmdRead, 0, uint64(i), offs[i], lens[i])...)
			c.mu.Lock()
			c.pending[uint64(i)] = pendingReq{cmdRead, offs[i], lens[i]}
			c.mu.Unlock()
		}
		go c.conn.Write(batch) // all at once, before reading any reply
		seen := make([]bool, n)
		for range n {
			r, err := c.next()
			if err != nil {
				t.Fatalf("pipelined replies: %v", err)
			}
			i := r.handle
			if i >= n || seen[i] {
				t.Fatalf("reply handle %d unexpected", i)
			}
			seen[i] = true
			if r.errno != 0 || !bytes.Equal(r.data, want[offs[i]:offs[i]+uint64(lens[i])]) {
				t.Fatalf("pipelined read %d wrong", i)
			}
		}
		c.disconnect()
	}},
	{"leave-mid-reply", func(t *testing.T, addr string, _ []byte) {
		c := dialClient(t, addr, clientOpts{name: "disk"})
		for i := range 8 {
			c.conn.Write(header(cmdRead, 0, uint64(i), 0, testSize))
		}
		io.ReadFull(c.conn, make([]byte, 1000))
		c.conn.Close()
	}},
	{"leave-with-requests-in-flight", func(t *testing.T, addr string, _ []byte) {
		c := dialClient(t, addr, clientOpts{name: "disk", structured: true, meta: true})
		for i := range 200 {
			c.conn.Write(header(cmdBlockStatus, 0, uint64(i), 0, testSize))
			c.conn.Write(header(cmdRead, 0, uint64(i), uint64(i)*4096, 65536))
		}
		c.conn.Close()
	}},
	{"garbage", func(t *testing.T, addr string, _ []byte) {
		c := rawConn(t, addr)
		g := make([]byte, 5000)
		rand.NewChaCha8([32]byte{3, 4}).Read(g)
		c.Write(g)
		expectClosed(t, c, "garbage")
	}},
}

func TestHostileClients(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 31)
	addr := serve(t, newServer(t, dev))
	want := dev.snapshot()
	for _, hc := range hostileCases {
		t.Run(hc.name, func(t *testing.T) {
			hc.fn(t, addr, want)
			wellBehaved(t, addr, want)
		})
	}
}

func TestHostileWrites(t *testing.T) {
	t.Parallel()
	dev := newFakeDevice(1<<20, 32)
	s := newServer(t, dev)
	s.MaxRequest = 64 << 10
	addr := serve(t, s)
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	defer c.disconnect()
	// A write over MaxRequest is skipped, refused, and the stream stays
	// in sync.
	p := bytes.Repeat([]byte{0xaa}, 200<<10)
	if r := c.do(cmdWrite, 0, 0, uint32(len(p)), p); r.errno != errInval {
		t.Errorf("big write: errno %d", r.errno)
	}
	// Past the end, with payload.
	if r := c.do(cmdWrite, 0, 1<<20-10, 20, make([]byte, 20)); r.errno != errNoSpc {
		t.Errorf("write past end: errno %d", r.errno)
	}
	want := dev.snapshot()
	if want[0] == 0xaa && want[1] == 0xaa {
		t.Error("refused write was applied")
	}
	expectRead(t, c.read(0, 64<<10), want[:64<<10], 0)
	if r := c.do(cmdWrite, 0, 5, 3, []byte("abc")); r.errno != 0 {
		t.Errorf("small write: errno %d", r.errno)
	}
}

// TestSlowReader: a client that sends requests but never reads replies is
// dropped after WriteTimeout, and its connection's goroutines end.
func TestSlowReader(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 33)
	s := newServer(t, dev)
	s.WriteTimeout = 300 * time.Millisecond
	addr := serve(t, s)
	c := dialClient(t, addr, clientOpts{name: "disk"})
	go func() {
		for i := range 100 {
			if _, err := c.conn.Write(header(cmdRead, 0, uint64(i), 0, testSize)); err != nil {
				return
			}
		}
	}()
	time.Sleep(2 * time.Second)
	// The server gave up: draining the socket ends with EOF or reset.
	c.conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.Copy(io.Discard, c.conn); err != nil && !isReset(err) {
		t.Errorf("slow reader still connected: %v", err)
	}
	wellBehaved(t, addr, dev.snapshot())
}

func isReset(err error) bool {
	return err != nil && bytes.Contains([]byte(err.Error()), []byte("reset"))
}

// TestNoGoroutineLeak runs the hostile clients many times and checks that
// the goroutine count returns to where it was. Not parallel: it counts
// the whole process's goroutines.
func TestNoGoroutineLeak(t *testing.T) {
	dev := roDevice(testSize, 34)
	addr := serve(t, newServer(t, dev))
	want := dev.snapshot()
	wellBehaved(t, addr, want) // warm up pools and runtime goroutines
	settle()
	base := runtime.NumGoroutine()
	for range 5 {
		for _, hc := range hostileCases {
			hc.fn(t, addr, want)
		}
	}
	wellBehaved(t, addr, want)
	deadline := time.Now().Add(10 * time.Second)
	for {
		settle()
		n := runtime.NumGoroutine()
		if n <= base+2 {
			break
		}
		if time.Now().After(deadline) {
			buf := make([]byte, 1<<20)
			t.Fatalf("goroutines: %d, baseline %d\n%s", n, base, buf[:runtime.Stack(buf, true)])
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func settle() {
	for range 3 {
		runtime.GC()
		time.Sleep(20 * time.Millisecond)
	}
}
