package nbd

import (
	"context"
	"crypto/tls"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"time"

	"github.com/snapfs/snapfs/internal/bufpool"
)

var be = binary.BigEndian

// errClose ends a negotiation with a hard disconnect.
var errClose = errors.New("nbd: closing connection")

// negotiate runs the fixed newstyle handshake and option haggling. It
// returns true when the client chose an export and transmission begins.
func (c *conn) negotiate() bool {
	err := c.haggle()
	switch {
	case err == nil:
		c.setReadDeadline(time.Time{})
		c.raw.SetWriteDeadline(time.Time{})
		return true
	case errors.Is(err, errClose):
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed):
		c.log.Debug("nbd: client left during negotiation", "err", err)
	case errors.Is(err, os.ErrDeadlineExceeded) && c.isStopping():
		c.log.Debug("nbd: negotiation ended by shutdown")
	default:
		c.log.Warn("nbd: negotiation failed", "err", err)
	}
	return false
}

func (c *conn) haggle() error {
	s := c.s
	c.raw.SetWriteDeadline(time.Now().Add(s.handshakeTimeout()))
	var g [18]byte
	be.PutUint64(g[0:], magicNBD)
	be.PutUint64(g[8:], magicOpt)
	be.PutUint16(g[16:], flagFixedNewstyle|flagNoZeroes)
	c.bw.Write(g[:])
	if err := c.bw.Flush(); err != nil {
		return err
	}

	c.setReadDeadline(time.Now().Add(s.handshakeTimeout()))
	var cf [4]byte
	if _, err := io.ReadFull(c.br, cf[:]); err != nil {
		return err
	}
	flags := be.Uint32(cf[:])
	if flags&^(flagCFixedNewstyle|flagCNoZeroes) != 0 {
		c.log.Warn("nbd: unknown client flags; closing", "client_flags", flags)
		return errClose
	}
	c.fixed = flags&flagCFixedNewstyle != 0
	c.noZeroes = flags&flagCNoZeroes != 0
	if s.TLSMode == TLSRequire && !c.fixed {
		// TLS needs fixed newstyle; such a client can never upgrade.
		c.log.Warn("nbd: TLS required but the client does not speak fixed newstyle; closing")
		return errClose
	}

	var hdr [optHeaderLen]byte
	for i := 0; ; i++ {
		if i >= maxOptions {
			c.log.Warn("nbd: too many options; closing", "options", i)
			return errClose
		}
		c.setReadDeadline(time.Now().Add(s.handshakeTimeout()))
		c.raw.SetWriteDeadline(time.Now().Add(s.handshakeTimeout()))
		if _, err := io.ReadFull(c.br, hdr[:]); err != nil {
			return err
		}
		if m := be.Uint64(hdr[0:]); m != magicOpt {
			c.log.Warn("nbd: bad option magic; closing", "magic", m)
			return errClose
		}
		opt := be.Uint32(hdr[8:])
		n := be.Uint32(hdr[12:])
		if n > maxOptionLen {
			if opt == optExportName {
				c.log.Warn("nbd: export name too long; closing", "length", n)
				return errClose
			}
			// Skip the data without holding it; the deadline bounds a
			// client that sends it slowly.
			if _, err := io.CopyN(io.Discard, c.br, int64(n)); err != nil {
				return err
			}
			if err := c.optReply(opt, repErrInvalid, []byte("option data too long")); err != nil {
				return err
			}
			continue
		}
		bp := bufpool.Get(int(n))
		data := *bp
		_, err := io.ReadFull(c.br, data)
		if err == nil {
			var done bool
			done, err = c.option(opt, data)
			if err == nil && done {
				bufpool.Put(bp)
				return nil
			}
		}
		bufpool.Put(bp)
		if err != nil {
			return err
		}
	}
}

// option handles one option; done means transmission begins.
func (c *conn) option(opt uint32, data []byte) (done bool, err error) {
	s := c.s
	if opt == optAbort {
		// Reply, then close; a client that already left is no error.
		c.optReply(opt, repAck, nil)
		return false, errClose
	}
	if s.shuttingDown() || c.isStopping() {
		if opt == optExportName {
			return false, errClose
		}
		return false, c.optReply(opt, repErrShutdown, []byte("server is shutting down"))
	}
	if s.TLSMode == TLSRequire && !c.tls && opt != optStartTLS {
		if opt == optExportName {
			c.log.Warn("nbd: NBD_OPT_EXPORT_NAME before TLS; closing")
			return false, errClose
		}
		return false, c.optReply(opt, repErrTLSReqd, []byte("TLS is required: send NBD_OPT_STARTTLS first"))
	}

	switch opt {
	case optExportName:
		return c.optExportName(string(data))
	case optList:
		return false, c.optList(data)
	case optStartTLS:
		return false, c.optStartTLS(data)
	case optInfo, optGo:
		return c.optInfoGo(opt, data)
	case optStructuredReply:
		if len(data) != 0 {
			return false, c.optReply(opt, repErrInvalid, []byte("NBD_OPT_STRUCTURED_REPLY takes no data"))
		}
		c.structured = true
		return false, c.optReply(opt, repAck, nil)
	case optListMetaContext, optSetMetaContext:
		return false, c.optMetaContext(opt, data)
	default:
		return false, c.optReply(opt, repErrUnsup, []byte("option not supported"))
	}
}

// optReply sends one option reply.
func (c *conn) optReply(opt, typ uint32, data []byte) error {
	var h [optReplyHeaderLen]byte
	be.PutUint64(h[0:], magicOptReply)
	be.PutUint32(h[8:], opt)
	be.PutUint32(h[12:], typ)
	be.PutUint32(h[16:], uint32(len(data)))
	c.bw.Write(h[:])
	c.bw.Write(data)
	return c.bw.Flush()
}

func (c *conn) optExportName(name string) (bool, error) {
	e, ok := c.s.lookup(name)
	if !ok {
		// NBD_OPT_EXPORT_NAME cannot fail politely.
		c.log.Warn("nbd: unknown export; closing", "name", name)
		return false, errClose
	}
	c.enter(e)
	var b [8 + 2 + 124]byte
	be.PutUint64(b[0:], uint64(e.Device.Size()))
	be.PutUint16(b[8:], c.flags)
	n := len(b)
	if c.noZeroes {
		n = 10
	}
	c.bw.Write(b[:n])
	return true, c.bw.Flush()
}

// enter records the export chosen for transmission.
func (c *conn) enter(e Export) {
	c.export = e
	c.flags = c.transmissionFlags(e)
	c.maxReq = c.s.maxRequest()
	if c.metaExport != e.Name {
		// Contexts selected for another export do not carry over.
		c.metaBase = false
	}
}

func (c *conn) transmissionFlags(e Export) uint16 {
	f := uint16(flagHasFlags | flagSendFlush | flagSendCache | flagCanMultiConn)
	if e.Device.ReadOnly() {
		f |= flagReadOnly
	} else {
		f |= flagSendFUA | flagSendTrim | flagSendWriteZeroes
	}
	if c.structured {
		f |= flagSendDF
	}
	return f
}

func (c *conn) optList(data []byte) error {
	if len(data) != 0 {
		return c.optReply(optList, repErrInvalid, []byte("NBD_OPT_LIST takes no data"))
	}
	for _, e := range c.s.Exports() {
		if e.Device == nil {
			continue
		}
		name := clip(e.Name, maxStringLen)
		desc := clip(e.Description, maxStringLen)
		b := make([]byte, 4, 4+len(name)+len(desc))
		be.PutUint32(b, uint32(len(name)))
		b = append(b, name...)
		b = append(b, desc...)
		if err := c.optReply(optList, repServer, b); err != nil {
			return err
		}
	}
	return c.optReply(optList, repAck, nil)
}

func (c *conn) optStartTLS(data []byte) error {
	s := c.s
	switch {
	case len(data) != 0:
		return c.optReply(optStartTLS, repErrInvalid, []byte("NBD_OPT_STARTTLS takes no data"))
	case c.tls:
		return c.optReply(optStartTLS, repErrInvalid, []byte("TLS already negotiated"))
	case s.TLSMode == TLSOff || s.TLSConfig == nil:
		return c.optReply(optStartTLS, repErrPolicy, []byte("TLS is not offered"))
	case !c.fixed:
		return c.optReply(optStartTLS, repErrUnsup, []byte("TLS needs fixed newstyle negotiation"))
	}
	if err := c.optReply(optStartTLS, repAck, nil); err != nil {
		return err
	}
	if c.br.Buffered() > 0 {
		// The client must wait for our reply before starting TLS.
		c.log.Warn("nbd: data after NBD_OPT_STARTTLS before the TLS handshake; closing")
		return errClose
	}
	cfg := s.TLSConfig.Clone()
	if cfg.MinVersion == 0 {
		cfg.MinVersion = tls.VersionTLS12
	}
	tc := tls.Server(c.raw, cfg)
	ctx, cancel := context.WithDeadline(c.ctx, time.Now().Add(s.handshakeTimeout()))
	defer cancel()
	c.setReadDeadline(time.Now().Add(s.handshakeTimeout()))
	if err := tc.HandshakeContext(ctx); err != nil {
		c.log.Warn("nbd: TLS handshake failed; closing", "err", err)
		return errClose
	}
	c.nc = tc
	c.br.Reset(tc)
	c.bw.Reset(tc)
	c.tls = true
	// Negotiation starts over under TLS: nothing agreed before it holds.
	c.structured = false
	c.metaBase = false
	c.metaExport = ""
	return nil
}

func (c *conn) optInfoGo(opt uint32, data []byte) (bool, error) {
	name, reqs, ok := parseInfoRequest(data)
	if !ok {
		return false, c.optReply(opt, repErrInvalid, []byte("malformed NBD_OPT_INFO/NBD_OPT_GO"))
	}
	e, found := c.s.lookup(name)
	if !found {
		return false, c.optReply(opt, repErrUnknown, []byte("unknown export"))
	}
	var wantName, wantDesc bool
	for _, r := range reqs {
		switch r {
		case infoName:
			wantName = true
		case infoDescription:
			wantDesc = true
		}
	}
	flags := c.transmissionFlags(e)

	var b [2 + 12]byte
	be.PutUint16(b[0:], infoExport)
	be.PutUint64(b[2:], uint64(e.Device.Size()))
	be.PutUint16(b[10:], flags)
	if err := c.optReply(opt, repInfo, b[:12]); err != nil {
		return false, err
	}
	if wantName {
		n := clip(e.Name, maxStringLen)
		if err := c.optReply(opt, repInfo, append([]byte{0, infoName}, n...)); err != nil {
			return false, err
		}
	}
	if wantDesc && e.Description != "" {
		d := clip(e.Description, maxStringLen)
		if err := c.optReply(opt, repInfo, append([]byte{0, infoDescription}, d...)); err != nil {
			return false, err
		}
	}
	// Always sent: our constraints are the defaults a client assumes
	// anyway (any alignment), and the maximum tells it to split requests.
	be.PutUint16(b[0:], infoBlockSize)
	be.PutUint32(b[2:], minBlockSize)
	be.PutUint32(b[6:], preferredBlockSize)
	be.PutUint32(b[10:], uint32(c.s.maxRequest()))
	if err := c.optReply(opt, repInfo, b[:14]); err != nil {
		return false, err
	}
	if err := c.optReply(opt, repAck, nil); err != nil {
		return false, err
	}
	if opt == optInfo {
		return false, nil
	}
	c.enter(e)
	return true, nil
}

// parseInfoRequest parses NBD_OPT_INFO / NBD_OPT_GO data: a 32-bit name
// length, the name, a 16-bit count of information requests and the 16-bit
// requests.
func parseInfoRequest(d []byte) (name string, reqs []uint16, ok bool) {
	if len(d) < 6 {
		return "", nil, false
	}
	nl := be.Uint32(d)
	d = d[4:]
	if nl > maxStringLen || uint64(nl)+2 > uint64(len(d)) {
		return "", nil, false
	}
	name = string(d[:nl])
	d = d[nl:]
	nr := int(be.Uint16(d))
	d = d[2:]
	if len(d) != 2*nr {
		return "", nil, false
	}
	reqs = make([]uint16, nr)
	for i := range reqs {
		reqs[i] = be.Uint16(d[2*i:])
	}
	return name, reqs, true
}

// parseMetaRequest parses NBD_OPT_LIST_META_CONTEXT / SET_META_CONTEXT
// data: a 32-bit export name length and name, a 32-bit query count, and
// each query as a 32-bit length and string.
func parseMetaRequest(d []byte) (name string, queries []string, ok bool) {
	str := func() (string, bool) {
		if len(d) < 4 {
			return "", false
		}
		n := be.Uint32(d)
		if n > maxStringLen || uint64(n) > uint64(len(d)-4) {
			return "", false
		}
		s := string(d[4 : 4+n])
		d = d[4+n:]
		return s, true
	}
	if name, ok = str(); !ok {
		return "", nil, false
	}
	if len(d) < 4 {
		return "", nil, false
	}
	nq := be.Uint32(d)
	d = d[4:]
	if uint64(nq)*4 > uint64(len(d)) {
		return "", nil, false
	}
	queries = make([]string, 0, nq)
	for range nq {
		q, ok := str()
		if !ok {
			return "", nil, false
		}
		queries = append(queries, q)
	}
	if len(d) != 0 {
		return "", nil, false
	}
	return name, queries, true
}

// optMetaContext answers NBD_OPT_LIST_META_CONTEXT and
// NBD_OPT_SET_META_CONTEXT. The only context is base:allocation; LIST
// without queries, or with the query "base:", lists it; SET selects it for
// the query "base:allocation". Queries in other namespaces match nothing.
func (c *conn) optMetaContext(opt uint32, data []byte) error {
	if !c.structured {
		return c.optReply(opt, repErrInvalid, []byte("negotiate structured replies first"))
	}
	name, queries, ok := parseMetaRequest(data)
	if !ok {
		return c.optReply(opt, repErrInvalid, []byte("malformed metadata context request"))
	}
	e, found := c.s.lookup(name)
	if !found {
		return c.optReply(opt, repErrUnknown, []byte("unknown export"))
	}
	match := false
	if opt == optListMetaContext && len(queries) == 0 {
		match = true
	}
	for _, q := range queries {
		if q == baseAllocation || (opt == optListMetaContext && q == "base:") {
			match = true
		}
	}
	var id uint32 // LIST replies carry id 0
	if opt == optSetMetaContext {
		c.metaBase = match
		c.metaExport = e.Name
		id = baseAllocationID
	}
	if match {
		b := make([]byte, 4, 4+len(baseAllocation))
		be.PutUint32(b, id)
		b = append(b, baseAllocation...)
		if err := c.optReply(opt, repMetaContext, b); err != nil {
			return err
		}
	}
	return c.optReply(opt, repAck, nil)
}

func clip(s string, n int) string {
	if len(s) > n {
		return s[:n]
	}
	return s
}
