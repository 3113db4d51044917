package nbd

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"sync"
	"testing"
	"time"
)

const testSize = 4<<20 + 1234 // not a multiple of any block size

// expectRead checks a successful read reply against the device.
func expectRead(t testing.TB, r *reply, want []byte, off uint64) {
	t.Helper()
	if r.errno != 0 {
		t.Fatalf("read at %d: errno %d (%s)", off, r.errno, r.msg)
	}
	if !bytes.Equal(r.data, want) {
		t.Fatalf("read at %d, %d bytes: data differs", off, len(want))
	}
}

func TestReadVariants(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 1)
	s := newServer(t, dev)
	tcp := serve(t, s)
	unix := serveUnix(t, s)
	want := dev.snapshot()
	for _, tc := range []struct {
		name string
		addr string
		o    clientOpts
	}{
		{"simple-go", tcp, clientOpts{name: "disk"}},
		{"simple-exportname", tcp, clientOpts{name: "disk", exportName: true}},
		{"simple-exportname-nozeroes", tcp, clientOpts{name: "disk", exportName: true, noZeroes: true}},
		{"structured", tcp, clientOpts{name: "disk", structured: true}},
		{"structured-exportname", tcp, clientOpts{name: "disk", structured: true, exportName: true}},
		{"default-export", tcp, clientOpts{name: "", structured: true}},
		{"unix", unix, clientOpts{name: "disk", structured: true, meta: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := dialClient(t, tc.addr, tc.o)
			defer c.disconnect()
			if c.size != testSize {
				t.Fatalf("size %d, want %d", c.size, testSize)
			}
			wantFlags := uint16(flagHasFlags | flagReadOnly | flagSendFlush | flagSendCache | flagCanMultiConn)
			if tc.o.structured {
				wantFlags |= flagSendDF
			}
			if c.flags != wantFlags {
				t.Fatalf("flags %#x, want %#x", c.flags, wantFlags)
			}
			rng := rand.New(rand.NewPCG(2, 3))
			for range 60 {
				off := rng.Uint64N(testSize)
				n := uint32(rng.Uint64N(min(testSize-off, 300000) + 1))
				expectRead(t, c.read(off, n), want[off:off+uint64(n)], off)
			}
			// The whole device in one request, and the last byte.
			expectRead(t, c.read(0, testSize), want, 0)
			expectRead(t, c.read(testSize-1, 1), want[testSize-1:], testSize-1)
			// Zero-length read.
			expectRead(t, c.read(testSize, 0), nil, testSize)
		})
	}
}

func listen(t testing.TB) net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func roDevice(size int64, seed uint64) *fakeDevice {
	d := newFakeDevice(size, seed)
	d.ro = true
	return d
}

func TestStructuredReadSkipsHoles(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 4)
	addr := serve(t, newServer(t, dev))
	want := dev.snapshot()
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	defer c.disconnect()

	r := c.read(0, testSize)
	expectRead(t, r, want, 0)
	var holes uint64
	for _, e := range dev.allExtents() {
		if e.Hole || e.Zero {
			holes += uint64(e.Length)
		}
	}
	if got := r.holeBytes(); got != holes {
		t.Errorf("hole chunks cover %d bytes, device has %d", got, holes)
	}
	if n := dev.holeReadBytes.Load(); n != 0 {
		t.Errorf("server read %d bytes of holes from the device", n)
	}
	if len(r.chunks) < 3 {
		t.Errorf("only %d chunks", len(r.chunks))
	}

	// DF: one data chunk with the zeros inline.
	c.send(cmdRead, cmdFlagDF, 9, 0, 1<<20, nil)
	r, err := c.next()
	if err != nil {
		t.Fatal(err)
	}
	expectRead(t, r, want[:1<<20], 0)
	if len(r.chunks) != 1 || r.chunks[0].typ != replyTypeOffsetData {
		t.Errorf("DF read: chunks %+v", r.chunks)
	}
}

func TestBlockStatus(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 5)
	addr := serve(t, newServer(t, dev))
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true, meta: true})
	defer c.disconnect()
	if c.metaID != baseAllocationID {
		t.Fatalf("context id %d", c.metaID)
	}

	// Walk the device as nbdinfo --map does, and compare.
	var got [][3]uint64 // off, len, flags
	for off := uint64(0); off < testSize; {
		n := uint32(min(testSize-off, 1<<30))
		r := c.do(cmdBlockStatus, 0, off, n, nil)
		if r.errno != 0 {
			t.Fatalf("block status at %d: errno %d", off, r.errno)
		}
		if r.metaID != c.metaID {
			t.Fatalf("metadata id %d", r.metaID)
		}
		for _, e := range r.extents {
			if k := len(got) - 1; k >= 0 && got[k][2] == uint64(e[1]) {
				got[k][1] += uint64(e[0])
			} else {
				got = append(got, [3]uint64{off, uint64(e[0]), uint64(e[1])})
			}
			off += uint64(e[0])
		}
	}
	var want [][3]uint64
	for _, e := range dev.allExtents() {
		var f uint64
		if e.Hole {
			f |= stateHole
		}
		if e.Zero {
			f |= stateZero
		}
		want = append(want, [3]uint64{uint64(e.Offset), uint64(e.Length), f})
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("block status:\n got %v\nwant %v", got, want)
	}

	// REQ_ONE: one extent.
	r := c.do(cmdBlockStatus, cmdFlagReqOne, 0, testSize, nil)
	if len(r.extents) != 1 || uint64(r.extents[0][0]) != want[0][1] {
		t.Errorf("REQ_ONE: %v", r.extents)
	}
	// Unaligned start inside the first extent.
	r = c.do(cmdBlockStatus, 0, 100, 1000, nil)
	if len(r.extents) != 1 || r.extents[0][0] != 1000 {
		t.Errorf("small query: %v", r.extents)
	}
	// Out of range, zero length.
	for _, q := range [][2]uint64{{testSize, 1}, {testSize - 1, 2}, {0, 0}} {
		if r := c.do(cmdBlockStatus, 0, q[0], uint32(q[1]), nil); r.errno != errInval {
			t.Errorf("block status %v: errno %d", q, r.errno)
		}
	}

	// Without a negotiated context, BLOCK_STATUS is EINVAL.
	c2 := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	defer c2.disconnect()
	if r := c2.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errInval {
		t.Errorf("block status without context: errno %d", r.errno)
	}
}

func TestNegotiationOptions(t *testing.T) {
	t.Parallel()
	dev := roDevice(1<<20, 6)
	dev2 := newFakeDevice(2<<20, 7)
	s := newServer(t, dev, Export{Name: "other", Device: dev2})
	s.MaxRequest = 1 << 20
	addr := serve(t, s)
	c := newTestClient(t, rawConn(t, addr))
	if err := c.greet(false); err != nil {
		t.Fatal(err)
	}

	// LIST: both exports, with descriptions, then ACK.
	c.sendOption(optList, nil)
	var names []string
	for {
		typ, data, err := c.optReply(optList)
		if err != nil {
			t.Fatal(err)
		}
		if typ == repAck {
			break
		}
		if typ != repServer {
			t.Fatalf("LIST reply %#x", typ)
		}
		nl := be.Uint32(data)
		names = append(names, string(data[4:4+nl])+"|"+string(data[4+nl:]))
	}
	if fmt.Sprint(names) != "[disk|a fake disk other|]" {
		t.Errorf("LIST: %q", names)
	}
	if typ, _, _ := c.option(optList, []byte("x")); typ != repErrInvalid {
		t.Errorf("LIST with data: %#x", typ)
	}

	// INFO does not end negotiation and reports everything.
	info, err := c.infoGo(optInfo, "other", infoName, infoDescription, infoBlockSize)
	if err != nil {
		t.Fatal(err)
	}
	if info.typ != repAck || info.size != 2<<20 || info.name != "other" || info.flags&flagReadOnly != 0 {
		t.Errorf("INFO other: %+v", info)
	}
	if info.flags&(flagSendTrim|flagSendWriteZeroes|flagSendFUA) != flagSendTrim|flagSendWriteZeroes|flagSendFUA {
		t.Errorf("writable export flags %#x", info.flags)
	}
	if info.minB != 1 || info.prefB != 4096 || info.maxB != 1<<20 {
		t.Errorf("block sizes %d %d %d", info.minB, info.prefB, info.maxB)
	}
	// The empty name is ambiguous with two exports.
	if info, err := c.infoGo(optInfo, ""); err != nil || info.typ != repErrUnknown {
		t.Errorf("INFO \"\": %+v %v", info, err)
	}
	if info, err := c.infoGo(optGo, "nope"); err != nil || info.typ != repErrUnknown {
		t.Errorf("GO nope: %+v %v", info, err)
	}
	// Malformed INFO: name length past the data.
	if typ, _, _ := c.option(optInfo, []byte{0, 0, 1, 0, 'a', 0, 0}); typ != repErrInvalid {
		t.Errorf("malformed INFO: %#x", typ)
	}
	// Unknown options, and ones we do not implement.
	for _, o := range []uint32{optPeekExport, optExtendedHeaders, 99, 1 << 31} {
		if typ, _, _ := c.option(o, []byte("abc")); typ != repErrUnsup {
			t.Errorf("option %d: %#x", o, typ)
		}
	}
	// Meta contexts need structured replies first.
	if _, err := c.metaContext(optListMetaContext, "disk"); err == nil {
		t.Error("LIST_META_CONTEXT before STRUCTURED_REPLY succeeded")
	}
	if typ, _, _ := c.option(optStructuredReply, []byte{1}); typ != repErrInvalid {
		t.Errorf("STRUCTURED_REPLY with data: %#x", typ)
	}
	if typ, _, _ := c.option(optStructuredReply, nil); typ != repAck {
		t.Fatalf("STRUCTURED_REPLY: %#x", typ)
	}
	c.structured = true
	for _, q := range []struct {
		opt     uint32
		queries []string
		want    string
	}{
		{optListMetaContext, nil, "[{0 base:allocation}]"},
		{optListMetaContext, []string{"base:"}, "[{0 base:allocation}]"},
		{optListMetaContext, []string{"base:allocation"}, "[{0 base:allocation}]"},
		{optListMetaContext, []string{"qemu:dirty-bitmap:a", "x-foo:bar"}, "[]"},
		{optSetMetaContext, []string{"qemu:allocation-depth"}, "[]"},
		{optSetMetaContext, []string{"base:"}, "[]"},
		{optSetMetaContext, []string{"x:y", "base:allocation"}, "[{1 base:allocation}]"},
	} {
		got, err := c.metaContext(q.opt, "disk", q.queries...)
		if err != nil || fmt.Sprint(got) != q.want {
			t.Errorf("meta %d %q: %v %v, want %s", q.opt, q.queries, got, err, q.want)
		}
	}
	if _, err := c.metaContext(optSetMetaContext, "nope", baseAllocation); err == nil {
		t.Error("SET_META_CONTEXT on an unknown export succeeded")
	}
	// STARTTLS without TLS configured.
	if typ, _, _ := c.option(optStartTLS, nil); typ != repErrPolicy {
		t.Errorf("STARTTLS: %#x", typ)
	}
	// Oversized option data is skipped and refused.
	big := make([]byte, maxOptionLen+1)
	if typ, _, _ := c.option(optInfo, big); typ != repErrInvalid {
		t.Errorf("big option: %#x", typ)
	}
	// Contexts were set for "disk"; GO to "other" drops them.
	info, err = c.infoGo(optGo, "other")
	if err != nil || info.typ != repAck {
		t.Fatalf("GO other: %+v %v", info, err)
	}
	if info.flags&flagSendDF == 0 {
		t.Errorf("no SEND_DF with structured replies: %#x", info.flags)
	}
	if r := c.do(cmdBlockStatus, 0, 0, 4096, nil); r.errno != errInval {
		t.Errorf("block status with contexts of another export: errno %d", r.errno)
	}
	// Requests above MaxRequest.
	if r := c.read(0, 1<<20+1); r.errno != errOverflow {
		t.Errorf("big structured read: errno %d", r.errno)
	}
	c.disconnect()

	// ABORT gets an ACK.
	c = newTestClient(t, rawConn(t, addr))
	if err := c.greet(false); err != nil {
		t.Fatal(err)
	}
	if typ, _, err := c.option(optAbort, nil); err != nil || typ != repAck {
		t.Errorf("ABORT: %#x %v", typ, err)
	}
	if _, err := c.br.ReadByte(); err == nil {
		t.Error("connection open after ABORT")
	}
}

func TestWritable(t *testing.T) {
	t.Parallel()
	dev := newFakeDevice(testSize, 8)
	addr := serve(t, newServer(t, dev))
	for _, structured := range []bool{false, true} {
		c := dialClient(t, addr, clientOpts{name: "disk", structured: structured, meta: structured})
		want := dev.snapshot()
		if c.flags&flagReadOnly != 0 {
			t.Fatalf("flags %#x", c.flags)
		}
		p := bytes.Repeat([]byte("snapfs!"), 3000)
		off := uint64(12345)
		if r := c.do(cmdWrite, 0, off, uint32(len(p)), p); r.errno != 0 {
			t.Fatalf("write: %d", r.errno)
		}
		copy(want[off:], p)
		f0 := dev.flushes.Load()
		if r := c.do(cmdWrite, cmdFlagFUA, 100, 3, []byte("fua")); r.errno != 0 {
			t.Fatalf("FUA write: %d", r.errno)
		}
		copy(want[100:], "fua")
		if dev.flushes.Load() != f0+1 {
			t.Errorf("FUA write did not flush")
		}
		if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 || dev.flushes.Load() != f0+2 {
			t.Errorf("flush: %d", r.errno)
		}
		if r := c.do(cmdTrim, 0, 1<<20, 1<<16, nil); r.errno != 0 {
			t.Errorf("trim: %d", r.errno)
		}
		clear(want[1<<20 : 1<<20+1<<16])
		if r := c.do(cmdWriteZeroes, cmdFlagNoHole, 2<<20+7, 100000, nil); r.errno != 0 {
			t.Errorf("write zeroes: %d", r.errno)
		}
		clear(want[2<<20+7 : 2<<20+7+100000])
		if r := c.do(cmdCache, 0, 0, 1<<20, nil); r.errno != 0 || dev.prefetch.Load() == 0 {
			t.Errorf("cache: %d", r.errno)
		}
		expectRead(t, c.read(0, testSize), want, 0)
		if !bytes.Equal(dev.snapshot(), want) {
			t.Error("device content differs")
		}
		if structured {
			r := c.do(cmdBlockStatus, 0, 1<<20, 1<<16, nil)
			if len(r.extents) != 1 || r.extents[0][1] != stateHole|stateZero {
				t.Errorf("trimmed range status %v", r.extents)
			}
		}
		// Past the end: ENOSPC for writes, EINVAL for trim.
		if r := c.do(cmdWrite, 0, testSize-1, 2, []byte("xx")); r.errno != errNoSpc {
			t.Errorf("write past end: %d", r.errno)
		}
		if r := c.do(cmdWriteZeroes, 0, testSize, 1, nil); r.errno != errNoSpc {
			t.Errorf("write zeroes past end: %d", r.errno)
		}
		if r := c.do(cmdTrim, 0, testSize+1, 0, nil); r.errno != errInval {
			t.Errorf("trim past end: %d", r.errno)
		}
		// The connection is still in sync after refused writes.
		expectRead(t, c.read(off, 10), want[off:off+10], off)
		c.disconnect()
	}

	// Read-only export: EPERM, and the payload is still consumed.
	ro := roDevice(1<<20, 9)
	addr = serve(t, newServer(t, ro))
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	defer c.disconnect()
	for _, typ := range []uint16{cmdWrite, cmdTrim, cmdWriteZeroes} {
		var p []byte
		if typ == cmdWrite {
			p = make([]byte, 5000)
		}
		r := c.do(typ, 0, 0, 5000, p)
		if r.errno != errPerm || r.msg == "" {
			t.Errorf("%s on read-only: errno %d msg %q", cmdName(typ), r.errno, r.msg)
		}
	}
	want := ro.snapshot()
	expectRead(t, c.read(0, 1<<20), want, 0)
	if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != 0 {
		t.Errorf("flush on read-only: %d", r.errno)
	}
}

func TestConcurrentRequests(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 10)
	dev.latency = 50 * time.Millisecond
	s := newServer(t, dev)
	s.MaxInFlight = 16
	addr := serve(t, s)
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	defer c.disconnect()
	want := dev.snapshot()

	const n = 64
	start := time.Now()
	go func() {
		for i := range n {
			c.send(cmdRead, 0, uint64(i), uint64(i)*4096*5, 4096, nil)
		}
	}()
	seen := map[uint64]bool{}
	for range n {
		r, err := c.next()
		if err != nil {
			t.Fatal(err)
		}
		off := r.handle * 4096 * 5
		expectRead(t, r, want[off:off+4096], off)
		seen[r.handle] = true
	}
	el := time.Since(start)
	if len(seen) != n {
		t.Errorf("%d distinct replies", len(seen))
	}
	if m := dev.maxActive.Load(); m > 16 || m < 8 {
		t.Errorf("max concurrent device calls %d, want 8..16", m)
	}
	// Serially this would take n × 50 ms (hole-only reads skip the device,
	// so allow for fewer).
	if el > n*50*time.Millisecond/3 {
		t.Errorf("%d reads took %v: not concurrent", n, el)
	}
}

// TestTotalBytes: the payloads of all connections together stay within
// MaxTotalBytes plus one request per connection (each connection alone
// may hold MaxInFlightBytes), and every read is still answered right.
func TestTotalBytes(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	dev := roDevice(size, 13)
	dev.latency = 20 * time.Millisecond
	s := newServer(t, dev)
	s.MaxRequest = 1 << 20
	s.MaxInFlightBytes = 32 << 20
	s.MaxTotalBytes = 6 << 20
	addr := serve(t, s)
	want := dev.snapshot()
	var wg sync.WaitGroup
	for i := range 4 {
		wg.Go(func() {
			c := dialClient(t, addr, clientOpts{name: "disk"})
			defer c.disconnect()
			const n = 32
			go func() {
				for j := range n {
					c.send(cmdRead, 0, uint64(j), uint64(i*n+j)<<18, 1<<20, nil)
				}
			}()
			for range n {
				r, err := c.next()
				if err != nil {
					t.Error(err)
					return
				}
				off := uint64(i*n)<<18 + r.handle<<18
				if r.errno != 0 || !bytes.Equal(r.data, want[off:off+1<<20]) {
					t.Errorf("conn %d: read at %d wrong (errno %d)", i, off, r.errno)
					return
				}
			}
		})
	}
	wg.Wait()
	if m := dev.maxActiveBytes.Load(); m > 6<<20+4<<20 || m < 2<<20 {
		t.Errorf("at most %d bytes read at once, want 2-10 MiB (the total budget and a request per connection)", m)
	}
}

// TestTotalBytesSlowReader: a client that stops reading its replies holds
// the whole MaxTotalBytes until WriteTimeout drops it; another client is
// still answered meanwhile (its request goes without the shared budget
// while its connection has nothing else in flight).
func TestTotalBytesSlowReader(t *testing.T) {
	t.Parallel()
	const size = 64 << 20
	dev := roDevice(size, 14)
	s := newServer(t, dev)
	s.MaxRequest = 1 << 20
	s.MaxTotalBytes = 2 << 20
	s.WriteTimeout = time.Minute
	addr := serve(t, s)
	slow := dialClient(t, addr, clientOpts{name: "disk"})
	defer slow.conn.Close()
	go func() {
		for i := range 200 {
			if _, err := slow.conn.Write(header(cmdRead, 0, uint64(i), uint64(i%60)<<20, 1<<20)); err != nil {
				return
			}
		}
	}()
	// Until the slow client's replies fill the socket buffers and its
	// reads hold the budget.
	full := func() bool {
		b := s.totalBytes()
		b.mu.Lock()
		defer b.mu.Unlock()
		return b.used == b.max
	}
	for deadline := time.Now().Add(20 * time.Second); !full(); time.Sleep(10 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the slow client never held the total budget")
		}
	}
	time.Sleep(200 * time.Millisecond)
	c := dialClient(t, addr, clientOpts{name: "disk", structured: true})
	defer c.disconnect()
	want := dev.snapshot()
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := range 4 {
			off := uint64(i) << 20
			expectRead(t, c.read(off, 1<<20), want[off:off+1<<20], off)
		}
	}()
	select {
	case <-done:
	case <-time.After(15 * time.Second):
		t.Fatal("a well-behaved client waited for a client that does not read its replies")
	}
}

func TestManyConnections(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 11)
	addr := serve(t, newServer(t, dev))
	want := dev.snapshot()
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Go(func() {
			c := dialClient(t, addr, clientOpts{name: "disk", structured: i%2 == 0})
			defer c.disconnect()
			rng := rand.New(rand.NewPCG(uint64(i), 1))
			for range 50 {
				off := rng.Uint64N(testSize - 70000)
				n := uint32(rng.Uint64N(70000))
				c.send(cmdRead, 0, 1, off, n, nil)
				r, err := c.next()
				if err != nil {
					t.Error(err)
					return
				}
				if r.errno != 0 || !bytes.Equal(r.data, want[off:off+uint64(n)]) {
					t.Errorf("conn %d: read [%d,+%d) wrong (errno %d)", i, off, n, r.errno)
					return
				}
			}
		})
	}
	wg.Wait()
}

func TestDeviceFaults(t *testing.T) {
	t.Parallel()
	dev := newFakeDevice(testSize, 12)
	addr := serve(t, newServer(t, dev))
	want := dev.snapshot()
	bad := func(off, n int64) error {
		if off < 1<<20 && off+n > 1<<20-100 {
			return errors.New("injected: object store unreachable")
		}
		return nil
	}
	dev.failRead.Store(&bad)
	for _, structured := range []bool{false, true} {
		c := dialClient(t, addr, clientOpts{name: "disk", structured: structured, meta: structured})
		r := c.read(1<<20-200, 1000)
		if r.errno != errIO || !structured && r.data != nil {
			t.Errorf("failing read: errno %d", r.errno)
		}
		if structured && (r.msg == "" || bytes.Contains([]byte(r.msg), []byte("injected"))) {
			t.Errorf("error message %q", r.msg)
		}
		expectRead(t, c.read(0, 4096), want[:4096], 0)
		if structured {
			if r := c.do(cmdBlockStatus, 0, 1<<20-4096, 8192, nil); r.errno != errIO {
				t.Errorf("failing extents: errno %d", r.errno)
			}
		}
		dev.failFlush.Store(true)
		if r := c.do(cmdFlush, 0, 0, 0, nil); r.errno != errIO {
			t.Errorf("failing flush: errno %d", r.errno)
		}
		if r := c.do(cmdWrite, cmdFlagFUA, 0, 1, []byte{1}); r.errno != errIO {
			t.Errorf("FUA write with failing flush: errno %d", r.errno)
		}
		dev.failFlush.Store(false)
		copy(want, []byte{1})
		// A panicking device is an EIO, not a dead server.
		dev.panicRead.Store(true)
		if r := c.read(0, 10); r.errno != errIO {
			t.Errorf("panicking read: errno %d", r.errno)
		}
		// Also when the data runs between holes are read in parallel.
		if r := c.read(0, 1<<20); r.errno != errIO {
			t.Errorf("panicking read of many runs: errno %d", r.errno)
		}
		dev.panicRead.Store(false)
		expectRead(t, c.read(8192, 4096), want[8192:8192+4096], 8192)
		c.disconnect()
	}
}

func TestShutdownFinishesInFlight(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 13)
	dev.latency = 300 * time.Millisecond
	s := newServer(t, dev)
	l := listen(t)
	done := make(chan error, 1)
	go func() { done <- s.Serve(l) }()
	c := dialClient(t, l.Addr().String(), clientOpts{name: "disk", structured: true})
	// A client still negotiating is dropped.
	idle := rawConn(t, l.Addr().String())
	c.send(cmdRead, 0, 1, 0, 65536, nil)
	time.Sleep(50 * time.Millisecond) // the read reaches the device
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := s.Shutdown(ctx); err != nil {
		t.Fatal(err)
	}
	r, err := c.next()
	if err != nil {
		t.Fatalf("in-flight read lost: %v", err)
	}
	expectRead(t, r, dev.snapshot()[:65536], 0)
	if _, err := c.next(); err == nil {
		t.Error("connection open after shutdown")
	}
	idle.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := idle.Read(make([]byte, 100)); err != nil {
		t.Errorf("greeting: %v", err)
	}
	if err := <-done; err != ErrServerClosed {
		t.Errorf("Serve: %v", err)
	}
	if err := s.Serve(listen(t)); err != ErrServerClosed {
		t.Errorf("Serve after shutdown: %v", err)
	}

	// Shutdown with a deadline too short for a slow device closes anyway.
	dev2 := roDevice(1<<20, 14)
	dev2.latency = 5 * time.Second
	s2 := newServer(t, dev2)
	l2 := listen(t)
	go s2.Serve(l2)
	c2 := dialClient(t, l2.Addr().String(), clientOpts{name: "disk"})
	c2.send(cmdRead, 0, 1, 0, 512, nil)
	time.Sleep(50 * time.Millisecond)
	ctx2, cancel2 := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel2()
	if err := s2.Shutdown(ctx2); !errors.Is(err, context.DeadlineExceeded) {
		t.Errorf("short shutdown: %v", err)
	}
}

// TestServeConnContext: canceling ServeConn's context stops the connection
// like Shutdown does: the request in flight is answered, then it closes.
func TestServeConnContext(t *testing.T) {
	t.Parallel()
	dev := roDevice(testSize, 15)
	dev.latency = 200 * time.Millisecond
	s := newServer(t, dev)
	l := listen(t)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		nc, err := l.Accept()
		if err != nil {
			t.Error(err)
			return
		}
		s.ServeConn(ctx, nc)
	}()
	c := dialClient(t, l.Addr().String(), clientOpts{name: "disk", structured: true})
	c.send(cmdRead, 0, 1, 4096, 8192, nil)
	time.Sleep(50 * time.Millisecond)
	cancel()
	r, err := c.next()
	if err != nil {
		t.Fatalf("in-flight read lost: %v", err)
	}
	expectRead(t, r, dev.snapshot()[4096:4096+8192], 4096)
	if _, err := c.next(); err == nil {
		t.Error("connection open after its context was canceled")
	}
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("ServeConn did not return")
	}
}
