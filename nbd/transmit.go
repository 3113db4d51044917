package nbd

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"time"

	"golang.org/x/sync/errgroup"
	"golang.org/x/sync/semaphore"

	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/internal/bufpool"
)

// request is one transmission request, owned by its worker goroutine.
type request struct {
	typ, flags uint16
	handle     uint64
	off        uint64
	length     uint32

	buf     *[]byte // WRITE payload
	held    int64   // bytes held in conn.bytes
	shared  bool    // held also in the server's MaxTotalBytes
	replied bool    // a reply was started
}

func (r *request) String() string {
	return fmt.Sprintf("%s off=%d len=%d", cmdName(r.typ), r.off, r.length)
}

func cmdName(t uint16) string {
	switch t {
	case cmdRead:
		return "READ"
	case cmdWrite:
		return "WRITE"
	case cmdDisc:
		return "DISC"
	case cmdFlush:
		return "FLUSH"
	case cmdTrim:
		return "TRIM"
	case cmdCache:
		return "CACHE"
	case cmdWriteZeroes:
		return "WRITE_ZEROES"
	case cmdBlockStatus:
		return "BLOCK_STATUS"
	}
	return fmt.Sprintf("CMD(%d)", t)
}

// transmit reads requests and hands each to a worker goroutine, at most
// MaxInFlight at once, until the client disconnects, sends NBD_CMD_DISC,
// breaks the protocol or the server stops the connection; then it waits for
// the requests in flight.
func (c *conn) transmit() {
	c.slots = make(chan struct{}, c.s.maxInFlight())
	c.bytes = semaphore.NewWeighted(c.s.maxInFlightBytes())
	defer c.inflight.Wait()

	var h [requestHeaderLen]byte
	for {
		if _, err := io.ReadFull(c.br, h[:]); err != nil {
			c.readFailed(err)
			return
		}
		if m := be.Uint32(h[0:]); m != magicRequest {
			c.log.Warn("nbd: bad request magic; closing", "magic", fmt.Sprintf("%#x", m))
			return
		}
		r := &request{
			flags:  be.Uint16(h[4:]),
			typ:    be.Uint16(h[6:]),
			handle: be.Uint64(h[8:]),
			off:    be.Uint64(h[16:]),
			length: be.Uint32(h[24:]),
		}
		if r.typ == cmdDisc {
			c.log.Debug("nbd: NBD_CMD_DISC")
			return
		}
		c.nreq.Add(1)
		if !c.admit(r) {
			return
		}
	}
}

func (c *conn) readFailed(err error) {
	switch {
	case errors.Is(err, io.EOF):
		c.log.Debug("nbd: client closed the connection without NBD_CMD_DISC")
	case errors.Is(err, os.ErrDeadlineExceeded) && c.isStopping():
		c.log.Debug("nbd: stopped reading requests for shutdown")
	case errors.Is(err, net.ErrClosed), c.ctx.Err() != nil:
		c.log.Debug("nbd: connection closed", "err", err)
	case errors.Is(err, io.ErrUnexpectedEOF):
		c.log.Warn("nbd: truncated request; closing")
	default:
		c.log.Warn("nbd: reading request failed; closing", "err", err)
	}
}

// admit takes a slot for r, reads its payload, and either answers it at
// once (invalid requests) or starts its worker. It returns false when the
// connection must stop reading.
func (c *conn) admit(r *request) bool {
	select {
	case c.slots <- struct{}{}:
	case <-c.ctx.Done():
		return false
	}
	c.inflight.Add(1)

	if e := c.check(r); e != 0 {
		if r.typ == cmdWrite {
			// The payload is on the wire whatever we think of it; skip it
			// without buffering it.
			if _, err := io.CopyN(io.Discard, c.br, int64(r.length)); err != nil {
				c.readFailed(err)
				c.release(r)
				return false
			}
		}
		c.log.Debug("nbd: refused request", "req", r.String(), "flags", r.flags, "errno", e)
		c.replyErr(r, e, errnoText(e))
		c.release(r)
		return true
	}

	if r.typ == cmdRead || r.typ == cmdWrite {
		n := int64(r.length)
		if err := c.bytes.Acquire(c.ctx, n); err != nil {
			c.release(r)
			return false
		}
		shared, ok := c.takePayload(n)
		if !ok {
			c.bytes.Release(n)
			c.release(r)
			return false
		}
		r.held, r.shared = n, shared
	}
	if r.typ == cmdWrite {
		r.buf = bufpool.Get(int(r.length))
		if _, err := io.ReadFull(c.br, *r.buf); err != nil {
			c.readFailed(err)
			c.release(r)
			return false
		}
	}
	go c.work(r)
	return true
}

// takePayload reserves n payload bytes of the server's MaxTotalBytes, or
// goes without them when the connection holds no other payload (shared
// false), so that no other client can stall this one. It waits while
// neither holds; false when the connection stops meanwhile.
func (c *conn) takePayload(n int64) (shared, ok bool) {
	b := c.s.totalBytes()
	for {
		took, wake := b.take(n)
		switch {
		case took:
			c.payloads.Add(1)
			return true, true
		case c.payloads.Load() == 0:
			c.payloads.Add(1)
			return false, true
		}
		select {
		case <-wake:
		case <-c.ctx.Done():
			return false, false
		}
	}
}

// release frees what r holds, once it was answered.
func (c *conn) release(r *request) {
	if r.buf != nil {
		bufpool.Put(r.buf)
		r.buf = nil
	}
	if r.held > 0 {
		c.payloads.Add(-1)
		if r.shared {
			c.s.totalBytes().give(r.held)
		} else {
			c.s.totalBytes().give(0) // wakes this connection's reader if it waits
		}
		c.bytes.Release(r.held)
		r.held, r.shared = 0, false
	}
	<-c.slots
	c.inflight.Done()
}

// check validates r against the negotiated flags and the export, returning
// the error to answer with, or 0.
func (c *conn) check(r *request) uint32 {
	var allowed uint16 = cmdFlagFUA // valid on every command
	switch r.typ {
	case cmdRead:
		if c.structured {
			allowed |= cmdFlagDF
		}
	case cmdWrite, cmdFlush, cmdTrim, cmdCache:
	case cmdWriteZeroes:
		allowed |= cmdFlagNoHole
	case cmdBlockStatus:
		allowed |= cmdFlagReqOne
	default:
		return errInval
	}
	if r.flags&^allowed != 0 {
		return errInval
	}

	dev := c.export.Device
	size := uint64(dev.Size())
	inRange := r.off <= size && uint64(r.length) <= size-r.off
	ro := dev.ReadOnly()
	switch r.typ {
	case cmdRead:
		if int64(r.length) > int64(c.maxReq) {
			if c.structured {
				return errOverflow
			}
			return errInval
		}
		if !inRange {
			return errInval
		}
	case cmdWrite:
		if ro {
			return errPerm
		}
		if int64(r.length) > int64(c.maxReq) {
			return errInval
		}
		if !inRange {
			return errNoSpc // the spec's answer to writes past the end
		}
	case cmdWriteZeroes:
		if ro {
			return errPerm
		}
		if !inRange {
			return errNoSpc
		}
	case cmdTrim:
		if ro {
			return errPerm
		}
		if !inRange {
			return errInval
		}
	case cmdCache:
		if !inRange {
			return errInval
		}
	case cmdBlockStatus:
		if !c.metaBase || r.length == 0 || !inRange {
			return errInval
		}
	}
	return 0
}

// work serves one admitted request and answers it.
func (c *conn) work(r *request) {
	defer c.release(r)
	defer func() {
		if p := recover(); p != nil {
			c.log.Error("nbd: panic serving request", "req", r.String(), "panic", p, "stack", stack())
			if r.replied {
				c.kill() // the reply may be half written
			} else {
				c.replyErr(r, errIO, errnoText(errIO))
			}
		}
	}()

	dev := c.export.Device
	ctx := c.ctx
	off := int64(r.off)
	n := int64(r.length)
	fua := r.flags&cmdFlagFUA != 0
	var err error
	switch r.typ {
	case cmdRead:
		c.read(r)
		return
	case cmdBlockStatus:
		c.blockStatus(r)
		return
	case cmdWrite:
		var w int
		w, err = dev.WriteAt(ctx, *r.buf, off)
		if err == nil && w != len(*r.buf) {
			err = io.ErrShortWrite
		}
	case cmdFlush:
		err = dev.Flush(ctx)
	case cmdTrim:
		err = dev.Trim(ctx, off, n)
	case cmdWriteZeroes:
		err = dev.WriteZeroes(ctx, off, n)
	case cmdCache:
		err = dev.Prefetch(ctx, off, n)
	}
	if err == nil && fua && r.typ != cmdFlush && r.typ != cmdCache {
		err = dev.Flush(ctx)
	}
	if err != nil {
		c.fail(r, err)
		return
	}
	c.replyOK(r)
}

// fail logs a device error and answers r with it.
func (c *conn) fail(r *request, err error) {
	e := errno(err)
	c.nfail.Add(1)
	if c.ctx.Err() != nil {
		// The connection is going away; nobody will read the reply.
		c.log.Debug("nbd: request canceled", "req", cmdName(r.typ), "offset", r.off, "err", err)
		c.replyErr(r, e, errnoText(e))
		return
	}
	c.log.Warn("nbd: request failed", "req", cmdName(r.typ), "offset", r.off, "length", r.length, "errno", e, "err", err)
	c.replyErr(r, e, errnoText(e))
}

// span is a run of the request's range with one allocation status.
type span struct {
	off, n     int64
	hole, zero bool
}

// cover turns the device's extents into spans covering [off, off+n)
// exactly. Gaps, and extents the device got wrong, become spans of unknown
// status (data), so a wrong Extents costs reads, never data. Adjacent spans
// of the same status are merged.
func cover(exts []disk.Extent, off, n int64) []span {
	end := off + n
	pos := off
	out := make([]span, 0, min(len(exts), 64)+1)
	add := func(s span) {
		if s.n <= 0 {
			return
		}
		if k := len(out) - 1; k >= 0 && out[k].hole == s.hole && out[k].zero == s.zero && out[k].off+out[k].n == s.off {
			out[k].n += s.n
			return
		}
		out = append(out, s)
	}
	for _, e := range exts {
		if pos >= end {
			break
		}
		if e.Length <= 0 || e.Offset < 0 {
			continue
		}
		eEnd := e.Offset + e.Length
		if e.Length > math.MaxInt64-e.Offset {
			eEnd = math.MaxInt64
		}
		if eEnd <= pos {
			continue
		}
		if e.Offset > pos {
			stop := min(e.Offset, end)
			add(span{off: pos, n: stop - pos})
			pos = stop
			if pos >= end {
				break
			}
		}
		stop := min(eEnd, end)
		// A hole reads as zeros (disk.Extent).
		add(span{off: pos, n: stop - pos, hole: e.Hole, zero: e.Zero || e.Hole})
		pos = stop
	}
	if pos < end {
		add(span{off: pos, n: end - pos})
	}
	return out
}

// read answers NBD_CMD_READ. With structured replies (and no DF), ranges
// the device reports as holes or zeros go out as NBD_REPLY_TYPE_OFFSET_HOLE
// chunks without being read.
func (c *conn) read(r *request) {
	dev := c.export.Device
	off := int64(r.off)
	n := int64(r.length)
	bp := bufpool.Get(int(n))
	defer bufpool.Put(bp)
	buf := *bp

	readAt := func(ctx context.Context, p []byte, at int64) error {
		if len(p) == 0 {
			return nil
		}
		got, err := dev.ReadAt(ctx, p, at)
		if err == nil && got != len(p) {
			err = io.ErrUnexpectedEOF
		}
		if err != nil {
			return fmt.Errorf("read at %d: %w", at, err)
		}
		return nil
	}

	if !c.structured || r.flags&cmdFlagDF != 0 || n == 0 {
		if err := readAt(c.ctx, buf, off); err != nil {
			c.fail(r, err)
			return
		}
		c.replyData(r, buf)
		return
	}

	var spans []span
	exts, err := dev.Extents(c.ctx, off, n)
	if err != nil {
		c.log.Debug("nbd: extents failed; reading the whole range", "offset", off, "length", n, "err", err)
		spans = []span{{off: off, n: n}}
	} else {
		spans = mergeZero(cover(exts, off, n))
	}
	// The data runs between holes are read in parallel: on a lazy device
	// each may be a fetch from the object store.
	var data []span
	for _, s := range spans {
		if !s.zero {
			data = append(data, s)
		}
	}
	if len(data) == 1 {
		s := data[0]
		err = readAt(c.ctx, buf[s.off-off:s.off-off+s.n], s.off)
	} else if len(data) > 1 {
		g, gctx := errgroup.WithContext(c.ctx)
		g.SetLimit(maxReadsPerRequest)
		for _, s := range data {
			g.Go(func() (err error) {
				// A panic here would escape the worker's recover.
				defer func() {
					if p := recover(); p != nil {
						c.log.Error("nbd: panic in device read", "offset", s.off, "panic", p, "stack", stack())
						err = fmt.Errorf("panic in device read: %v", p)
					}
				}()
				return readAt(gctx, buf[s.off-off:s.off-off+s.n], s.off)
			})
		}
		err = g.Wait()
	}
	if err != nil {
		c.fail(r, err)
		return
	}
	c.replyChunks(r, spans, buf, off)
}

// mergeZero merges adjacent spans that read the same way (zeros or data),
// in place.
func mergeZero(spans []span) []span {
	out := spans[:0]
	for _, s := range spans {
		if k := len(out) - 1; k >= 0 && out[k].zero == s.zero {
			out[k].n += s.n
			continue
		}
		out = append(out, s)
	}
	return out
}

// blockStatus answers NBD_CMD_BLOCK_STATUS for base:allocation.
func (c *conn) blockStatus(r *request) {
	off := int64(r.off)
	n := int64(r.length)
	exts, err := c.export.Device.Extents(c.ctx, off, n)
	if err != nil {
		c.fail(r, err)
		return
	}
	spans := cover(exts, off, n)
	limit := maxExtentsPerReply
	if r.flags&cmdFlagReqOne != 0 {
		limit = 1
	}
	if len(spans) > limit {
		spans = spans[:limit]
	}
	c.replyBlockStatus(r, spans)
}

// Replies. Each is written whole while holding wmu; the last writer
// waiting flushes, so concurrent small replies share system calls.

type replyWriter struct {
	c   *conn
	err error
}

// write buffers or writes p. Large payloads go out a piece at a time, each
// with a fresh write deadline: WriteTimeout bounds a stall, not the time a
// large reply takes on a slow link.
func (w *replyWriter) write(p []byte) {
	for len(p) > 0 && w.err == nil {
		n := len(p)
		if n > writePiece {
			n = writePiece
			w.c.raw.SetWriteDeadline(time.Now().Add(w.c.s.writeTimeout()))
		}
		_, w.err = w.c.bw.Write(p[:n])
		p = p[n:]
	}
}

// send runs fn with the reply lock held.
func (c *conn) send(r *request, fn func(w *replyWriter)) {
	c.pending.Add(1)
	c.wmu.Lock()
	defer c.wmu.Unlock()
	last := c.pending.Add(-1) == 0
	r.replied = true
	if c.werr != nil {
		return
	}
	c.raw.SetWriteDeadline(time.Now().Add(c.s.writeTimeout()))
	w := &replyWriter{c: c}
	fn(w)
	if w.err == nil && last {
		c.raw.SetWriteDeadline(time.Now().Add(c.s.writeTimeout()))
		w.err = c.bw.Flush()
	}
	if w.err != nil {
		c.werr = w.err
		c.log.Debug("nbd: writing reply failed; closing", "err", w.err)
		// The client is gone or stuck: stop everything on this connection.
		c.kill()
	}
}

func (c *conn) simpleHeader(w *replyWriter, r *request, e uint32) {
	var h [simpleReplyLen]byte
	be.PutUint32(h[0:], magicSimpleReply)
	be.PutUint32(h[4:], e)
	be.PutUint64(h[8:], r.handle)
	w.write(h[:])
}

func (c *conn) chunkHeader(w *replyWriter, r *request, flags, typ uint16, length uint32) {
	var h [chunkHeaderLen]byte
	be.PutUint32(h[0:], magicStructuredRepl)
	be.PutUint16(h[4:], flags)
	be.PutUint16(h[6:], typ)
	be.PutUint64(h[8:], r.handle)
	be.PutUint32(h[16:], length)
	w.write(h[:])
}

// replyOK answers a request without payload successfully. A simple reply
// is allowed for it even with structured replies.
func (c *conn) replyOK(r *request) {
	c.send(r, func(w *replyWriter) { c.simpleHeader(w, r, 0) })
}

// replyErr answers r with error e: an NBD_REPLY_TYPE_ERROR chunk carrying
// msg when structured replies are on, else a simple reply (for a READ,
// without data).
func (c *conn) replyErr(r *request, e uint32, msg string) {
	c.send(r, func(w *replyWriter) {
		if !c.structured {
			c.simpleHeader(w, r, e)
			return
		}
		msg = clip(msg, maxStringLen)
		c.chunkHeader(w, r, replyFlagDone, replyTypeError, uint32(6+len(msg)))
		var b [6]byte
		be.PutUint32(b[0:], e)
		be.PutUint16(b[4:], uint16(len(msg)))
		w.write(b[:])
		w.write([]byte(msg))
	})
}

// replyData answers a READ with all its data in one piece.
func (c *conn) replyData(r *request, data []byte) {
	c.send(r, func(w *replyWriter) {
		if !c.structured {
			c.simpleHeader(w, r, 0)
			w.write(data)
			return
		}
		if len(data) == 0 {
			c.chunkHeader(w, r, replyFlagDone, replyTypeNone, 0)
			return
		}
		c.chunkHeader(w, r, replyFlagDone, replyTypeOffsetData, uint32(8+len(data)))
		var b [8]byte
		be.PutUint64(b[:], r.off)
		w.write(b[:])
		w.write(data)
	})
}

// replyChunks answers a structured READ with one chunk per span: data from
// buf (which holds the request's range starting at off), holes as
// NBD_REPLY_TYPE_OFFSET_HOLE. Everything was read before, so the last
// chunk can carry the DONE flag.
func (c *conn) replyChunks(r *request, spans []span, buf []byte, off int64) {
	c.send(r, func(w *replyWriter) {
		var b [12]byte
		for i, s := range spans {
			var flags uint16
			if i == len(spans)-1 {
				flags = replyFlagDone
			}
			be.PutUint64(b[0:], uint64(s.off))
			if s.zero {
				c.chunkHeader(w, r, flags, replyTypeOffsetHole, 12)
				be.PutUint32(b[8:], uint32(s.n))
				w.write(b[:12])
				continue
			}
			c.chunkHeader(w, r, flags, replyTypeOffsetData, uint32(8+s.n))
			w.write(b[:8])
			w.write(buf[s.off-off : s.off-off+s.n])
		}
	})
}

// replyBlockStatus answers NBD_CMD_BLOCK_STATUS with one
// NBD_REPLY_TYPE_BLOCK_STATUS chunk for base:allocation.
func (c *conn) replyBlockStatus(r *request, spans []span) {
	p := make([]byte, 4+8*len(spans))
	be.PutUint32(p[0:], baseAllocationID)
	for i, s := range spans {
		var st uint32
		if s.hole {
			st |= stateHole
		}
		if s.zero {
			st |= stateZero
		}
		be.PutUint32(p[4+8*i:], uint32(s.n))
		be.PutUint32(p[8+8*i:], st)
	}
	c.send(r, func(w *replyWriter) {
		c.chunkHeader(w, r, replyFlagDone, replyTypeBlockStatus, uint32(len(p)))
		w.write(p)
	})
}
