// Package nbd serves disk.Device exports over the Network Block Device
// protocol (fixed newstyle negotiation, structured replies, base:allocation
// block status, STARTTLS), as specified by the NetworkBlockDevice project's
// doc/proto.md.
//
// Requests on one connection are served concurrently, up to MaxInFlight at a
// time; each reply is written whole, by one goroutine at a time. Exports
// advertise NBD_FLAG_CAN_MULTI_CONN, writable ones included: every connection
// of an export shares one Device, whose Flush makes all completed writes
// durable whichever connection made them, as the flag requires.
//
// Errors: disk.ErrReadOnly is EPERM, disk.ErrOutOfRange and invalid
// requests EINVAL, writes past the end ENOSPC (as the protocol asks), reads
// over MaxRequest EOVERFLOW with structured replies, and any other device
// failure EIO, logged once with the export and offset; the connection
// carries on. Structured error chunks carry a generic message only, since a
// device's error text may name object-store URLs.
//
// Not implemented: extended headers (NBD_OPT_EXTENDED_HEADERS is
// unsupported), NBD_FLAG_SEND_FAST_ZERO, resizing, and metadata contexts
// other than base:allocation.
package nbd

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sync/semaphore"

	"github.com/snapfs/snapfs/disk"
)

// Export is one named device on offer.
type Export struct {
	Name        string
	Description string // shown by NBD_OPT_LIST and NBD_INFO_DESCRIPTION
	Device      disk.Device
}

// ExportList returns an Exports function offering a fixed set of exports.
func ExportList(exports ...Export) func() []Export {
	list := append([]Export(nil), exports...)
	return func() []Export { return list }
}

// TLSMode says whether clients may or must upgrade to TLS with
// NBD_OPT_STARTTLS.
type TLSMode int

const (
	// TLSOff refuses NBD_OPT_STARTTLS (NOTLS mode).
	TLSOff TLSMode = iota
	// TLSAllow lets clients upgrade if they wish (SELECTIVETLS mode with
	// no TLS-only export).
	TLSAllow
	// TLSRequire errors every option but STARTTLS and ABORT with
	// NBD_REP_ERR_TLS_REQD until the client upgrades (FORCEDTLS mode).
	TLSRequire
)

func (m TLSMode) String() string {
	switch m {
	case TLSOff:
		return "off"
	case TLSAllow:
		return "allow"
	case TLSRequire:
		return "require"
	}
	return fmt.Sprintf("TLSMode(%d)", int(m))
}

// ErrServerClosed is returned by Serve after Shutdown or Close.
var ErrServerClosed = errors.New("nbd: server closed")

// Server serves exports over NBD. Set its fields before the first Serve or
// ServeConn and leave them alone afterwards.
type Server struct {
	// Exports lists the exports on offer. It is called at every lookup, so
	// the set may change while the server runs. The empty export name
	// selects the only export when there is exactly one (as qemu-nbd does),
	// unless an export is named "".
	Exports func() []Export

	// TLSConfig is needed for any TLSMode but TLSOff. Versions before TLS
	// 1.2 are refused unless the config sets MinVersion itself.
	TLSConfig *tls.Config
	TLSMode   TLSMode

	// MaxInFlight bounds the requests of one connection served at once;
	// the connection's reader waits when it is reached. Default 64.
	MaxInFlight int
	// MaxRequest is the largest READ or WRITE payload, advertised as the
	// maximum block size. Default 32 MiB.
	MaxRequest int
	// MaxInFlightBytes bounds the payload buffers one connection holds at
	// once (reads and writes in flight). Default 4 × MaxRequest; never
	// less than MaxRequest.
	MaxInFlightBytes int64
	// MaxTotalBytes bounds the payload buffers that connections hold
	// beyond one request each, all connections together, so that the
	// memory a server holds grows with the number of clients by at most
	// one request each. A connection with nothing in flight never waits
	// for it: a client that stops reading its replies cannot stall the
	// others. Default 32 MiB; never less than MaxRequest.
	MaxTotalBytes int64
	// HandshakeTimeout bounds the wait for each option and the TLS
	// handshake during negotiation. Default 30 s.
	HandshakeTimeout time.Duration
	// WriteTimeout bounds how long writing a reply may stall (for each
	// MiB of a large reply), so that a client which stops reading cannot
	// hold its connection's requests forever; the connection is then
	// reset. Default 60 s.
	WriteTimeout time.Duration

	// Logger gets connection and failure logs; slog.Default() if nil.
	Logger *slog.Logger

	totalOnce sync.Once
	total     *budget // MaxTotalBytes

	mu        sync.Mutex
	listeners map[*net.Listener]struct{}
	conns     map[*conn]struct{}
	closing   bool
}

func (s *Server) logger() *slog.Logger {
	if s.Logger != nil {
		return s.Logger
	}
	return slog.Default()
}

func (s *Server) maxInFlight() int {
	if s.MaxInFlight > 0 {
		return s.MaxInFlight
	}
	return defaultMaxInFlight
}

func (s *Server) maxRequest() int {
	n := s.MaxRequest
	if n <= 0 {
		n = defaultMaxRequest
	}
	// The preferred block size must not exceed the maximum, and a payload
	// length is 32 bits (less the 8-byte offset of a data chunk).
	n = max(n, preferredBlockSize)
	return min(n, 1<<31)
}

func (s *Server) maxInFlightBytes() int64 {
	n := s.MaxInFlightBytes
	if n <= 0 {
		n = 4 * int64(s.maxRequest())
	}
	return max(n, int64(s.maxRequest()))
}

// totalBytes returns the budget of MaxTotalBytes, made on first use.
func (s *Server) totalBytes() *budget {
	s.totalOnce.Do(func() {
		n := s.MaxTotalBytes
		if n <= 0 {
			n = defaultMaxTotalBytes
		}
		s.total = &budget{max: max(n, int64(s.maxRequest()))}
	})
	return s.total
}

// budget is a byte budget shared by connections. Unlike a semaphore, it
// lets a waiter also watch for its own connection going idle (see
// conn.takePayload): a give wakes all waiters, of which there is at most
// one per connection.
type budget struct {
	mu   sync.Mutex
	max  int64
	used int64
	wake chan struct{} // closed by the next give; nil while nobody waits
}

// take reserves n bytes if they fit; otherwise it returns a channel
// closed at the next give.
func (b *budget) take(n int64) (bool, <-chan struct{}) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.used+n <= b.max {
		b.used += n
		return true, nil
	}
	if b.wake == nil {
		b.wake = make(chan struct{})
	}
	return false, b.wake
}

// give returns n bytes (none for 0) and wakes the waiters.
func (b *budget) give(n int64) {
	b.mu.Lock()
	b.used -= n
	if b.wake != nil {
		close(b.wake)
		b.wake = nil
	}
	b.mu.Unlock()
}

func (s *Server) handshakeTimeout() time.Duration {
	if s.HandshakeTimeout > 0 {
		return s.HandshakeTimeout
	}
	return defaultHandshakeTTL * time.Second
}

func (s *Server) writeTimeout() time.Duration {
	if s.WriteTimeout > 0 {
		return s.WriteTimeout
	}
	return defaultWriteTTL * time.Second
}

func (s *Server) checkConfig() error {
	switch s.TLSMode {
	case TLSOff:
	case TLSAllow, TLSRequire:
		if s.TLSConfig == nil {
			return fmt.Errorf("nbd: TLS mode %v needs a TLSConfig", s.TLSMode)
		}
	default:
		return fmt.Errorf("nbd: unknown TLS mode %d", int(s.TLSMode))
	}
	if s.Exports == nil {
		return errors.New("nbd: no Exports")
	}
	return nil
}

// lookup finds an export by name; the empty name selects the only export.
func (s *Server) lookup(name string) (Export, bool) {
	if s.Exports == nil {
		return Export{}, false
	}
	list := s.Exports()
	for _, e := range list {
		if e.Name == name && e.Device != nil {
			return e, true
		}
	}
	if name == "" && len(list) == 1 && list[0].Device != nil {
		return list[0], true
	}
	return Export{}, false
}

// Serve accepts connections on l and serves each in its own goroutine until
// l fails or the server is shut down, when it returns ErrServerClosed.
// Serve closes l when it returns.
func (s *Server) Serve(l net.Listener) error {
	if err := s.checkConfig(); err != nil {
		l.Close()
		return err
	}
	if !s.trackListener(&l, true) {
		l.Close()
		return ErrServerClosed
	}
	defer s.trackListener(&l, false)
	defer l.Close()

	var backoff time.Duration
	for {
		nc, err := l.Accept()
		if err != nil {
			if s.shuttingDown() {
				return ErrServerClosed
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.logger().Warn("nbd: accept failed; retrying", "err", err, "delay", backoff)
				time.Sleep(backoff)
				continue
			}
			return err
		}
		backoff = 0
		go s.ServeConn(context.Background(), nc)
	}
}

// ServeConn negotiates with the client on nc and serves it until it
// disconnects, ctx is done, or the server shuts down; it closes nc before
// returning. When ctx is done the connection stops reading requests, answers
// the ones in flight and closes, as on Shutdown.
func (s *Server) ServeConn(ctx context.Context, nc net.Conn) {
	log := s.logger().With("remote", nc.RemoteAddr().String())
	if err := s.checkConfig(); err != nil {
		log.Error("nbd: cannot serve", "err", err)
		nc.Close()
		return
	}
	opCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c := &conn{
		s:      s,
		raw:    nc,
		nc:     nc,
		log:    log,
		ctx:    opCtx,
		cancel: cancel,
	}
	c.br = bufio.NewReaderSize(nc, 64<<10)
	c.bw = bufio.NewWriterSize(nc, 64<<10)
	if !s.trackConn(c, true) {
		nc.Close()
		cancel()
		return
	}
	defer s.trackConn(c, false)
	stop := context.AfterFunc(ctx, c.stop)
	defer stop()
	defer cancel()
	c.serve()
}

// Shutdown stops the listeners, stops reading new requests (and ends
// negotiations in progress), lets the requests in flight finish and their
// replies be written, and closes the connections. If ctx is done first, the
// remaining connections are closed at once, their device calls canceled,
// and ctx's error returned.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		(*l).Close()
	}
	for c := range s.conns {
		c.stop()
	}
	s.mu.Unlock()

	t := time.NewTicker(5 * time.Millisecond)
	defer t.Stop()
	for {
		s.mu.Lock()
		n := len(s.conns)
		s.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-ctx.Done():
			s.closeConns()
			return ctx.Err()
		case <-t.C:
		}
	}
}

// Close stops the listeners and closes every connection at once, canceling
// the device calls in flight.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closing = true
	for l := range s.listeners {
		(*l).Close()
	}
	s.mu.Unlock()
	s.closeConns()
	return nil
}

func (s *Server) closeConns() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for c := range s.conns {
		c.kill()
	}
}

func (s *Server) shuttingDown() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closing
}

func (s *Server) trackListener(l *net.Listener, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closing {
			return false
		}
		if s.listeners == nil {
			s.listeners = make(map[*net.Listener]struct{})
		}
		s.listeners[l] = struct{}{}
	} else {
		delete(s.listeners, l)
	}
	return true
}

func (s *Server) trackConn(c *conn, add bool) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if add {
		if s.closing {
			return false
		}
		if s.conns == nil {
			s.conns = make(map[*conn]struct{})
		}
		s.conns[c] = struct{}{}
	} else {
		delete(s.conns, c)
	}
	return true
}

// conn is one client connection.
type conn struct {
	s      *Server
	raw    net.Conn // the socket, for deadlines and forced closes
	log    *slog.Logger
	ctx    context.Context // device calls; canceled when the connection dies
	cancel context.CancelFunc

	// Owned by the reader goroutine until transmission starts, then
	// read-only.
	nc         net.Conn // raw, or the TLS connection over it
	br         *bufio.Reader
	fixed      bool // client set NBD_FLAG_C_FIXED_NEWSTYLE
	noZeroes   bool // client set NBD_FLAG_C_NO_ZEROES
	tls        bool
	structured bool
	metaBase   bool   // base:allocation selected
	metaExport string // export the metadata contexts were selected for
	export     Export
	flags      uint16 // transmission flags sent to the client
	maxReq     int

	// Replies.
	wmu     sync.Mutex
	bw      *bufio.Writer
	werr    error
	pending atomic.Int32 // replies waiting for wmu; the last one flushes

	// Requests in flight, and counts for the log.
	nreq, nfail atomic.Int64
	inflight    sync.WaitGroup
	slots       chan struct{}
	bytes       *semaphore.Weighted
	payloads    atomic.Int32 // requests holding a payload buffer

	mu       sync.Mutex
	stopping bool // shutdown: reads are being interrupted
}

var longAgo = time.Unix(1, 0)

// stop interrupts the reader so that the connection finishes its requests
// in flight and closes.
func (c *conn) stop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopping = true
	c.raw.SetReadDeadline(longAgo)
}

func (c *conn) isStopping() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.stopping
}

// setReadDeadline sets a read deadline unless the connection is stopping.
func (c *conn) setReadDeadline(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.stopping {
		t = longAgo
	}
	c.raw.SetReadDeadline(t)
}

// kill closes the socket at once, dropping what the kernel still queues
// for it (a reset, not a FIN, so a stuck client costs no buffers), and
// cancels the device calls.
func (c *conn) kill() {
	c.cancel()
	if tc, ok := c.raw.(*net.TCPConn); ok {
		tc.SetLinger(0)
	}
	c.raw.Close()
}

func (c *conn) serve() {
	defer func() {
		if r := recover(); r != nil {
			c.log.Error("nbd: panic serving connection; closing it", "panic", r, "stack", stack())
			c.kill()
		}
	}()
	c.log.Debug("nbd: connection opened")
	ok := c.negotiate()
	if ok {
		c.log = c.log.With("export", c.export.Name)
		c.log.Info("nbd: client attached", "flags", c.flags, "structured", c.structured, "base_allocation", c.metaBase, "tls", c.tls)
		start := time.Now()
		c.transmit()
		c.close()
		c.log.Info("nbd: client detached", "requests", c.nreq.Load(), "failed", c.nfail.Load(), "duration", time.Since(start).Round(time.Millisecond))
		return
	}
	c.close()
	c.log.Debug("nbd: connection closed")
}

// close flushes what is pending and closes the connection (shutting TLS
// down first when it runs).
func (c *conn) close() {
	c.wmu.Lock()
	if c.werr == nil {
		c.raw.SetWriteDeadline(time.Now().Add(time.Second))
		if err := c.bw.Flush(); err != nil {
			c.werr = err
		}
	}
	c.wmu.Unlock()
	if tc, ok := c.nc.(*tls.Conn); ok && c.werr == nil {
		tc.Close() // sends close_notify, then closes raw
	}
	c.raw.Close()
	c.cancel()
}

func stack() string { return string(debug.Stack()) }
