//go:build linux

package bench

import (
	"bufio"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/minio/minio-go/v7"
	"github.com/rs/zerolog"
)

// procSet tracks the subprocesses a benchmark started so that all of them
// are killed when it ends, whatever path it ends by.
type procSet struct {
	mu    sync.Mutex
	procs map[*proc]bool
	n     int
	dir   string // logs
}

// proc is one subprocess in its own process group (so that killing it
// kills its children too), killed by the kernel if the benchmark dies.
type proc struct {
	name  string
	cmd   *exec.Cmd
	start time.Time
	done  chan struct{} // closed when waited for
	err   error         // the exit, valid after done
	log   string        // stdout+stderr
}

func (ps *procSet) start(env []string, name string, args ...string) (*proc, error) {
	return ps.startWith(nil, env, name, args...)
}

// startWith starts name with args and the extra files as fds 3 and up,
// logging its stdout and stderr to a file in ps.dir.
func (ps *procSet) startWith(extra []*os.File, env []string, name string, args ...string) (*proc, error) {
	ps.mu.Lock()
	ps.n++
	logPath := filepath.Join(ps.dir, fmt.Sprintf("%03d-%s.log", ps.n, filepath.Base(name)))
	ps.mu.Unlock()
	logf, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer logf.Close()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = extra
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	p := &proc{name: filepath.Base(name), cmd: cmd, done: make(chan struct{}), log: logPath}
	p.start = time.Now()
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	ps.mu.Lock()
	ps.procs[p] = true
	ps.mu.Unlock()
	go func() {
		p.err = cmd.Wait()
		close(p.done)
		ps.mu.Lock()
		delete(ps.procs, p)
		ps.mu.Unlock()
	}()
	return p, nil
}

// killAll kills every process still running and waits for them.
func (ps *procSet) killAll() {
	ps.mu.Lock()
	var left []*proc
	for p := range ps.procs {
		left = append(left, p)
	}
	ps.mu.Unlock()
	for _, p := range left {
		p.kill()
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// kill SIGKILLs the process group and waits for the process.
func (p *proc) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// stop sends SIGTERM and, if the process is still there after grace,
// SIGKILL, to its whole group; it waits for the process.
func (p *proc) stop(grace time.Duration) {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.kill()
	}
}

// wait waits for the process until timeout, then kills it; timedOut tells
// which happened.
func (p *proc) wait(timeout time.Duration) (timedOut bool) {
	select {
	case <-p.done:
		return false
	case <-time.After(timeout):
		p.kill()
		return true
	}
}

// logTail returns the last few lines of the process's output.
func (p *proc) logTail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return strings.TrimSpace(string(b))
}

// peakRSS is the process's VmHWM (peak resident set) in bytes, or -1.
func (p *proc) peakRSS() int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", p.cmd.Process.Pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest)
			if len(f) >= 1 {
				kb, err := strconv.ParseInt(f[0], 10, 64)
				if err == nil {
					return kb << 10
				}
			}
		}
	}
	return -1
}

// freeAddr returns a free 127.0.0.1:port.
func freeAddr() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// nbdServer is a running NBD server process.
type nbdServer struct {
	*proc
	addr   string
	export string
	ttfb   time.Duration // process start until the first 4 KiB read returned
}

func (s *nbdServer) uri() string { return "nbd://" + s.addr + "/" + s.export }

// startNBD starts a server listening on addr and waits until a 4 KiB read
// at offset 0 returns (at most timeout), measuring the time since the
// process started.
func (ps *procSet) startNBD(addr, export string, timeout time.Duration, env []string, name string, args ...string) (*nbdServer, error) {
	p, err := ps.start(env, name, args...)
	if err != nil {
		return nil, err
	}
	s := &nbdServer{proc: p, addr: addr, export: export}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var last error
	for {
		if p.exited() {
			return nil, fmt.Errorf("%s exited before serving (%v): %s", p.name, p.err, p.logTail())
		}
		err := nbdRead4K(ctx, addr, export)
		if err == nil {
			s.ttfb = time.Since(p.start)
			return s, nil
		}
		last = err
		select {
		case <-ctx.Done():
			p.kill()
			return nil, fmt.Errorf("%s: no 4 KiB read within %s: %v; log: %s", p.name, timeout, last, p.logTail())
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// NBD protocol constants (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
const (
	nbdMagic         = 0x4e42444d41474943 // "NBDMAGIC"
	nbdOptMagic      = 0x49484156454f5054 // "IHAVEOPT"
	nbdRepMagic      = 0x3e889045565a9
	nbdReqMagic      = 0x25609513
	nbdSimpleMagic   = 0x67446698
	nbdFlagFixedNew  = 1
	nbdFlagNoZeroes  = 2
	nbdOptExportName = 1
	nbdOptGo         = 7
	nbdRepAck        = 1
	nbdRepErrUnsup   = 1<<31 | 1
	nbdCmdRead       = 0
	nbdCmdDisc       = 2
)

// nbdRead4K connects to an NBD server, negotiates export (fixed newstyle,
// NBD_OPT_GO, simple replies), reads 4 KiB at offset 0 and disconnects.
func nbdRead4K(ctx context.Context, addr, export string) error {
	return nbdRead4KAt(ctx, addr, export, 0)
}

// nbdRead4KAt is nbdRead4K reading at offset off.
func nbdRead4KAt(ctx context.Context, addr, export string, off uint64) error {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	r := bufio.NewReader(conn)
	be := binary.BigEndian
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		return fmt.Errorf("greeting: %w", err)
	}
	if be.Uint64(hello[0:]) != nbdMagic || be.Uint64(hello[8:]) != nbdOptMagic {
		return errors.New("not a newstyle NBD server")
	}
	hflags := be.Uint16(hello[16:])
	if hflags&nbdFlagFixedNew == 0 {
		return errors.New("server is not fixed newstyle")
	}
	cflags := uint32(nbdFlagFixedNew)
	if hflags&nbdFlagNoZeroes != 0 {
		cflags |= nbdFlagNoZeroes
	}
	msg := be.AppendUint32(nil, cflags)
	msg = be.AppendUint64(msg, nbdOptMagic)
	msg = be.AppendUint32(msg, nbdOptGo)
	msg = be.AppendUint32(msg, uint32(4+len(export)+2))
	msg = be.AppendUint32(msg, uint32(len(export)))
	msg = append(msg, export...)
	msg = be.AppendUint16(msg, 0)
	if _, err := conn.Write(msg); err != nil {
		return err
	}
	for done := false; !done; {
		var rep [20]byte
		if _, err := io.ReadFull(r, rep[:]); err != nil {
			return fmt.Errorf("option reply: %w", err)
		}
		if be.Uint64(rep[0:]) != nbdRepMagic {
			return errors.New("bad option reply magic")
		}
		typ, n := be.Uint32(rep[12:]), be.Uint32(rep[16:])
		data := make([]byte, n)
		if _, err := io.ReadFull(r, data); err != nil {
			return err
		}
		switch {
		case typ == nbdRepAck:
			done = true
		case typ == nbdRepErrUnsup:
			// An old server: NBD_OPT_EXPORT_NAME, no reply but the export.
			msg := be.AppendUint64(nil, nbdOptMagic)
			msg = be.AppendUint32(msg, nbdOptExportName)
			msg = be.AppendUint32(msg, uint32(len(export)))
			msg = append(msg, export...)
			if _, err := conn.Write(msg); err != nil {
				return err
			}
			skip := 10
			if cflags&nbdFlagNoZeroes == 0 {
				skip += 124
			}
			if _, err := io.CopyN(io.Discard, r, int64(skip)); err != nil {
				return err
			}
			done = true
		case typ&(1<<31) != 0:
			return fmt.Errorf("NBD_OPT_GO %q: error %#x %s", export, typ, data)
		}
	}
	req := be.AppendUint32(nil, nbdReqMagic)
	req = be.AppendUint16(req, 0)
	req = be.AppendUint16(req, nbdCmdRead)
	req = be.AppendUint64(req, 1)
	req = be.AppendUint64(req, off)
	req = be.AppendUint32(req, 4096)
	if _, err := conn.Write(req); err != nil {
		return err
	}
	var rep [16]byte
	if _, err := io.ReadFull(r, rep[:]); err != nil {
		return fmt.Errorf("read reply: %w", err)
	}
	if be.Uint32(rep[0:]) != nbdSimpleMagic || be.Uint64(rep[8:]) != 1 {
		return errors.New("bad read reply")
	}
	if e := be.Uint32(rep[4:]); e != 0 {
		return fmt.Errorf("read: NBD error %d", e)
	}
	if _, err := io.CopyN(io.Discard, r, 4096); err != nil {
		return err
	}
	disc := be.AppendUint32(nil, nbdReqMagic)
	disc = be.AppendUint16(disc, 0)
	disc = be.AppendUint16(disc, nbdCmdDisc)
	disc = append(disc, make([]byte, 8+8+4)...)
	_, _ = conn.Write(disc)
	return nil
}

// outcome is how a measured run ended.
type outcome struct {
	value   float64 // seconds for copies, IOPS for random reads
	stalled bool    // no progress for the stall window (the run was killed)
	err     error   // failed otherwise (exit status, deadline, parse)
}

// nbdStall is how long a run may make no progress before it counts as
// stalled and is killed.
const nbdStall = 10 * time.Second

// nbdcopyRun copies the whole export of s to null: with nbdcopy's
// defaults and returns the wall time. It is killed as stalled when no byte
// moves for nbdStall: the bytes the server has sent on its connections
// (tcp_info through ss) and nbdcopy's progress ("N/100" on fd 3, which
// only moves per 128 MiB work unit) both stay put.
func (ps *procSet) nbdcopyRun(s *nbdServer, timeout time.Duration) outcome {
	uri := s.uri()
	_, port, _ := net.SplitHostPort(s.addr)
	pr, pw, err := os.Pipe()
	if err != nil {
		return outcome{err: err}
	}
	defer pr.Close()
	p, err := ps.startWith([]*os.File{pw}, nil, "nbdcopy", "--progress=3", uri, "null:")
	pw.Close() // the child has its copy
	if err != nil {
		return outcome{err: err}
	}
	var progress atomic.Int64
	progress.Store(-1)
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if n, _, ok := strings.Cut(sc.Text(), "/"); ok {
				if v, err := strconv.Atoi(n); err == nil {
					progress.Store(int64(v))
				}
			}
		}
	}()
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(timeout)
	lastProgress, lastSent, lastMove := int64(-2), int64(-1), time.Now()
	for {
		select {
		case <-p.done:
			d := time.Since(p.start)
			if p.err != nil {
				return outcome{err: fmt.Errorf("nbdcopy %s: %v: %s", uri, p.err, p.logTail())}
			}
			return outcome{value: d.Seconds()}
		case <-deadline:
			p.kill()
			return outcome{err: fmt.Errorf("nbdcopy %s: not done after %s (at %d%%)", uri, timeout, progress.Load())}
		case <-tick.C:
			v := progress.Load()
			sent, _ := tcpSent(port)
			if v != lastProgress || sent != lastSent {
				lastProgress, lastSent, lastMove = v, sent, time.Now()
			} else if time.Since(lastMove) > nbdStall {
				p.kill()
				return outcome{stalled: true, err: fmt.Errorf("nbdcopy %s: stalled at %d%%, %d bytes sent", uri, v, sent)}
			}
		}
	}
}

// tcpSent returns the bytes sent on the established TCP connections whose
// local port is port (a server's side of its clients' connections), from
// the kernel's tcp_info as ss prints it; ok is false when ss fails.
func tcpSent(port string) (n int64, ok bool) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, "ss", "-Htin", "state", "established", "( sport = :"+port+" )").Output()
	if err != nil {
		return 0, false
	}
	for _, f := range strings.Fields(string(out)) {
		if v, found := strings.CutPrefix(f, "bytes_sent:"); found {
			if x, err := strconv.ParseInt(v, 10, 64); err == nil {
				n += x
			}
		}
	}
	return n, true
}

// fioRun runs fio: 4 KiB random reads at iodepth qd over the whole of
// target for runtime, and returns the IOPS. engine holds fio's options
// that pick the engine and its target (fioNBD for an NBD export). fio logs IOPS per second;
// a window of nbdStall with no completed read counts as a stall, and so
// does fio not finishing within runtime+60s (it is then killed).
func (ps *procSet) fioRun(target string, engine []string, qd int, runtime time.Duration) outcome {
	ps.mu.Lock()
	ps.n++
	base := filepath.Join(ps.dir, fmt.Sprintf("%03d-fio", ps.n))
	ps.mu.Unlock()
	args := append([]string{"--name=rand"}, engine...)
	p, err := ps.start(nil, "fio", append(args,
		"--rw=randread", "--bs=4k", fmt.Sprintf("--iodepth=%d", qd), "--norandommap",
		"--time_based", fmt.Sprintf("--runtime=%dms", runtime.Milliseconds()), "--thread",
		"--output-format=json", "--output="+base+".json",
		"--write_iops_log="+base, "--log_avg_msec=1000")...)
	if err != nil {
		return outcome{err: err}
	}
	if p.wait(runtime + 60*time.Second) {
		return outcome{stalled: true, err: fmt.Errorf("fio %s QD%d: not done %s after its runtime", target, qd, 60*time.Second)}
	}
	if p.err != nil {
		return outcome{err: fmt.Errorf("fio %s QD%d: %v: %s", target, qd, p.err, p.logTail())}
	}
	out, err := os.ReadFile(base + ".json")
	if err != nil {
		return outcome{err: err}
	}
	if i := strings.IndexByte(string(out), '{'); i > 0 {
		out = out[i:]
	}
	var res struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				IOPS float64 `json:"iops"`
			} `json:"read"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(out, &res); err != nil || len(res.Jobs) != 1 {
		return outcome{err: fmt.Errorf("fio output: %v", err)}
	}
	if res.Jobs[0].Error != 0 {
		return outcome{err: fmt.Errorf("fio %s QD%d: error %d: %s", target, qd, res.Jobs[0].Error, p.logTail())}
	}
	o := outcome{value: res.Jobs[0].Read.IOPS}
	if gap := fioLongestIdle(base+"_iops.1.log", runtime); gap >= nbdStall {
		o.stalled = true
		o.err = fmt.Errorf("fio %s QD%d: no read completed for %s", target, qd, gap.Round(time.Second))
	}
	return o
}

// fioNBD is fioRun's engine for the NBD export at uri.
func fioNBD(uri string) []string { return []string{"--ioengine=nbd", "--uri=" + uri} }

// fioLongestIdle returns the longest span without a completed I/O in an
// IOPS log written with --log_avg_msec=1000 ("msec, iops, ...").
func fioLongestIdle(path string, runtime time.Duration) time.Duration {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0
	}
	var active []int64 // end of each window that saw I/O, ms
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ",")
		if len(f) < 2 {
			continue
		}
		t, err1 := strconv.ParseInt(strings.TrimSpace(f[0]), 10, 64)
		v, err2 := strconv.ParseInt(strings.TrimSpace(f[1]), 10, 64)
		if err1 == nil && err2 == nil && v > 0 {
			active = append(active, t)
		}
	}
	sort.Slice(active, func(i, j int) bool { return active[i] < active[j] })
	var longest, prev int64
	for _, t := range active {
		longest = max(longest, t-1000-prev)
		prev = t
	}
	longest = max(longest, runtime.Milliseconds()-prev)
	return time.Duration(longest) * time.Millisecond
}

// randomGets issues 4 KiB ranged GETs at random 4 KiB-aligned offsets of
// the object, qd in flight, for dur, and returns the rate: the most any
// server reading the object through cl could answer 4 KiB random reads.
func randomGets(cl *minio.Client, bucket, key string, size int64, qd int, dur time.Duration) outcome {
	ctx, cancel := context.WithTimeout(context.Background(), dur+60*time.Second)
	defer cancel()
	var ops, errs atomic.Int64
	var stop atomic.Bool
	var firstErr error
	var mu sync.Mutex
	var wg sync.WaitGroup
	start := time.Now()
	for w := 0; w < qd; w++ {
		wg.Add(1)
		go func(seed uint64) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seed, 99))
			buf := make([]byte, 4096)
			for !stop.Load() {
				off := rng.Int64N(size/4096) * 4096
				opts := minio.GetObjectOptions{}
				_ = opts.SetRange(off, off+4095)
				obj, err := cl.GetObject(ctx, bucket, key, opts)
				if err == nil {
					_, err = io.ReadFull(obj, buf)
					obj.Close()
				}
				if err != nil {
					if stop.Load() {
						return
					}
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					errs.Add(1)
					time.Sleep(10 * time.Millisecond)
					continue
				}
				ops.Add(1)
			}
		}(uint64(w))
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	tick := time.NewTicker(250 * time.Millisecond)
	defer tick.Stop()
	end := time.After(dur)
	last, lastMove := int64(0), time.Now()
	var o outcome
loop:
	for {
		select {
		case <-end:
			break loop
		case <-tick.C:
			if n := ops.Load(); n != last {
				last, lastMove = n, time.Now()
			} else if time.Since(lastMove) > nbdStall {
				o.stalled = true
				o.err = fmt.Errorf("random GETs of %s: none finished for %s", key, nbdStall)
				break loop
			}
		}
	}
	n, el := ops.Load(), time.Since(start)
	stop.Store(true)
	cancel()
	<-done
	mu.Lock()
	defer mu.Unlock()
	// A failed GET is retried; more than 1% of them failing fails the run.
	if e := errs.Load(); e > 0 && e*100 > n && o.err == nil {
		o.err = fmt.Errorf("random GETs of %s: %d of %d failed, first: %v", key, e, n+e, firstErr)
	}
	o.value = float64(n) / el.Seconds()
	return o
}

// latencyProxy is an in-process toxiproxy in front of MinIO that delays
// everything the server sends by the set latency.
type latencyProxy struct {
	p    *toxiproxy.Proxy
	addr string
}

func startLatencyProxy(upstream string) (*latencyProxy, error) {
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	p := toxiproxy.NewProxy(srv, "minio", "127.0.0.1:0", upstream)
	if err := p.Start(); err != nil {
		return nil, err
	}
	return &latencyProxy{p: p, addr: p.Listen}, nil
}

// setLatency sets the downstream latency toxic (0 removes it).
func (lp *latencyProxy) setLatency(ms int) error {
	_ = lp.p.Toxics.RemoveToxic(context.Background(), "latency")
	if ms == 0 {
		return nil
	}
	_, err := lp.p.Toxics.AddToxicJson(strings.NewReader(fmt.Sprintf(
		`{"name":"latency","type":"latency","stream":"downstream","toxicity":1,"attributes":{"latency":%d}}`, ms)))
	return err
}

func (lp *latencyProxy) stop() { lp.p.Stop() }

// proxyTransport is the HTTP transport of the Go limit clients: enough
// idle connections for 32 requests in flight, bounded waits.
func proxyTransport() *http.Transport {
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.MaxIdleConns = 256
	tr.MaxIdleConnsPerHost = 256
	tr.DisableCompression = true
	tr.ResponseHeaderTimeout = time.Minute
	return tr
}
