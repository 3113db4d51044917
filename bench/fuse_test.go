//go:build linux

package bench

import (
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/snapfs/snapfs/fs"
)

// The FUSE measurements, in table order.
const (
	fSeq    = "cold sequential read (dd bs=1M; NBD: nbdcopy), MB/s of object"
	fRand1  = "cold random 4 KiB QD1 (fio psync), IOPS"
	fRand32 = "cold random 4 KiB QD32 (fio io_uring, buffered), IOPS"
	fRSS    = "peak RSS, cold runs, MiB"
)

var fuseTests = []string{fSeq, fRand1, fRand32, fRSS}

// Who is measured in BenchmarkFUSE: the snapfs FUSE file, the snapfs NBD
// path on the same image, and the peer (nbdfuse over qemu-nbd over http).
const (
	wFUSE = "fuse"
	wNBD  = "nbd"
)

// BenchmarkFUSE reads the benchmark images (the same objects, MinIO and
// latency proxy as BenchmarkNBD) through the file of `snapfs mount`, cold
// (a fresh process per run) at 0 and 10 ms, and compares, interleaved,
// with the snapfs NBD path on the same image (`snapfs serve` read by
// nbdcopy) and with the peer: nbdfuse over qemu-nbd reading the object
// over http through the same proxy. It prints one markdown table with the
// ratios and the targets (FUSE sequential >= 0.7 x the NBD path and >= 3 x
// the peer) and counts stalled runs. Run:
//
//	go test ./bench -run '^$' -bench FUSE -benchtime 1x -timeout 60m
//
// The environment variables of BenchmarkNBD apply (SNAPFS_BENCH_QUICK,
// SNAPFS_BENCH_WRITE, SNAPFS_BENCH_ROUNDS, SNAPFS_BENCH_COLD_CACHE,
// SNAPFS_BENCH_BIN). Without nbdfuse (Debian package nbdfuse) the peer
// is skipped, with a message.
func BenchmarkFUSE(b *testing.B) {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		b.Skip("no /dev/fuse")
	}
	if _, err := exec.LookPath("dd"); err != nil {
		b.Skip("dd not installed")
	}
	bn, began, load0 := newNBDBench(b)
	if bn.snapfs == "" || exec.Command(bn.snapfs, "mount", "--help").Run() != nil {
		b.Skip("snapfs has no serve or mount command")
	}
	fb := &fuseBench{nbdBench: bn}
	if _, err := exec.LookPath("nbdfuse"); err != nil {
		fmt.Println("nbdfuse not installed (Debian package nbdfuse): the peer is skipped")
	} else {
		fb.nbdfuse = true
	}
	p := bn.p
	for round := 0; round < p.rounds*b.N; round++ {
		for _, lat := range p.latencies {
			if err := bn.proxy.setLatency(lat); err != nil {
				b.Fatal(err)
			}
			for _, img := range bn.imgs {
				t0 := time.Now()
				fb.cell(img, lat, round)
				fmt.Printf("round %d, %d ms, %s: %s\n", round+1, lat, img.name, time.Since(t0).Round(time.Second))
			}
		}
	}
	b.StopTimer()
	_ = bn.proxy.setLatency(0)

	table, met, targets := fb.table()
	header := fmt.Sprintf("BenchmarkFUSE (%s mode, %d round(s), fio %s, snapfs --cache-size %d MiB), run took %s, load average %s at the start, %s at the end",
		p.mode, p.rounds*b.N, p.fioRuntime, p.coldCache>>20, time.Since(began).Round(time.Second), load0, loadAvg())
	fmt.Printf("\n%s\n\n%s\n%s", header, table, fb.legend())
	b.ReportMetric(float64(met), "targets-met")
	b.ReportMetric(float64(targets), "targets")
	if os.Getenv("SNAPFS_BENCH_WRITE") == "1" {
		writeResults(b, header, table+"\n"+fb.legend())
	}
	stalls := 0
	for k, s := range bn.res {
		if k.who == wFUSE || k.who == wNBD {
			stalls += s.stalls
		}
	}
	if stalls > 0 {
		b.Errorf("snapfs stalled in %d runs", stalls)
	}
}

type fuseBench struct {
	*nbdBench
	nbdfuse bool // the peer can run
}

// cell measures one image at one latency: sequential reads through the
// FUSE file, the NBD path and the peer, then random reads through the
// FUSE file and the peer, each with a fresh process; who goes first flips
// from round to round.
func (fb *fuseBench) cell(img *nbdImage, lat, round int) {
	p := fb.p
	k := func(test, who string) rkey { return rkey{test, img.name, lat, who} }
	order := func(whos ...string) []string {
		if round%2 == 1 {
			for i, j := 0, len(whos)-1; i < j; i, j = i+1, j-1 {
				whos[i], whos[j] = whos[j], whos[i]
			}
		}
		return whos
	}
	for _, who := range order(wFUSE, wNBD, wPeer) {
		switch who {
		case wNBD:
			fb.withServer(wSnapfs, false, img, lat, k(fSeq, wNBD), func(s *nbdServer) {
				fb.add(k(fSeq, wNBD), fb.ps.nbdcopyRun(s, p.copyTimeout))
			})
		default:
			fb.withFile(who, img, lat, k(fSeq, who), func(file string, abort func()) {
				fb.add(k(fSeq, who), fb.ps.ddRun(file, p.copyTimeout, abort))
			})
		}
	}
	for _, qd := range []int{1, 32} {
		test, engine := fRand1, []string{"--ioengine=psync"}
		if qd == 32 {
			test, engine = fRand32, []string{"--ioengine=io_uring", "--direct=0"}
		}
		for _, who := range order(wFUSE, wPeer) {
			fb.withFile(who, img, lat, k(test, who), func(file string, abort func()) {
				// fio cannot be killed while it waits for a FUSE reply:
				// a run that outlives fioRun's own deadline aborts the
				// mount's connection, which fails the pending reads.
				t := time.AfterFunc(p.fioRuntime+75*time.Second, abort)
				defer t.Stop()
				args := append([]string{"--filename=" + file, "--readonly"}, engine...)
				fb.add(k(test, who), fb.ps.fioRun(file, args, qd, p.fioRuntime))
			})
		}
	}
}

// withFile mounts img's raw disk file with a fresh process (snapfs mount,
// or for the peer qemu-nbd over http through the proxy and nbdfuse on it),
// runs f on the file, records the peak RSS of the FUSE server and tears
// the mount down: the process is stopped and the mount point lazily
// unmounted if it is still there. abort, for f, fails every pending read
// of the mount. A mount that does not come up is a failure of k.
func (fb *fuseBench) withFile(who string, img *nbdImage, lat int, k rkey, f func(file string, abort func())) {
	if who == wPeer && !fb.nbdfuse {
		return
	}
	fb.ps.mu.Lock()
	fb.ps.n++
	mnt := filepath.Join(fb.ps.dir, fmt.Sprintf("%03d-mnt", fb.ps.n))
	fb.ps.mu.Unlock()
	if err := os.Mkdir(mnt, 0o755); err != nil {
		fb.add(k, outcome{err: err})
		return
	}
	defer os.Remove(mnt)
	defer lazyUnmount(mnt)
	// run waits for the mount and runs f; false when it failed.
	run := func(p *proc, file string) bool {
		if err := waitMounted(p, mnt, file, time.Minute); err != nil {
			fb.add(k, outcome{err: err})
			return false
		}
		f(file, func() { abortFUSE(mnt) })
		if p.exited() {
			fb.add(k, outcome{err: fmt.Errorf("%s exited during the run (%v): %s", p.name, p.err, p.logTail())})
			return false
		}
		return true
	}
	rss := rkey{fRSS, img.name, lat, who}
	switch who {
	case wFUSE:
		p, err := fb.ps.start(fb.snapfsEnv, fb.snapfs, "mount", "s3://bench/"+img.key, mnt,
			"--cache-size", strconv.FormatInt(fb.p.coldCache, 10), "--list-ttl", "0")
		if err != nil {
			fb.add(k, outcome{err: err})
			return
		}
		defer p.kill()
		if run(p, filepath.Join(mnt, strings.TrimSuffix(path.Base(img.key), ".qcow2")+".raw")) {
			fb.add(rss, outcome{value: float64(p.peakRSS())})
			p.stop(10 * time.Second) // SIGTERM: snapfs unmounts
		}
	case wPeer:
		fb.withServer(wPeer, false, img, lat, k, func(s *nbdServer) {
			file := filepath.Join(mnt, "disk")
			p, err := fb.ps.start(nil, "nbdfuse", "-r", file, s.uri())
			if err != nil {
				fb.add(k, outcome{err: err})
				return
			}
			defer p.kill()
			if run(p, file) {
				fb.add(rss, outcome{value: float64(p.peakRSS() + s.peakRSS())})
				lazyUnmount(mnt)
				p.stop(10 * time.Second)
			}
		})
	}
}

// waitMounted waits until p has mounted a FUSE file system on mnt that
// shows file, at most timeout. Looking at the file goes through the
// mount, so it runs aside and the mount is aborted if it does not answer.
func waitMounted(p *proc, mnt, file string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if p.exited() {
			return fmt.Errorf("%s exited before mounting (%v): %s", p.name, p.err, p.logTail())
		}
		if typ, ok, _ := fs.MountType(mnt); ok && strings.HasPrefix(typ, "fuse") {
			done := make(chan error, 1)
			go func() {
				fi, err := os.Stat(file)
				if err == nil && fi.Size() == 0 {
					err = errors.New("empty")
				}
				done <- err
			}()
			select {
			case err := <-done:
				if err == nil {
					return nil
				}
				if time.Now().After(deadline) {
					return fmt.Errorf("%s: %v; log: %s", file, err, p.logTail())
				}
			case <-time.After(time.Until(deadline)):
				abortFUSE(mnt)
				return fmt.Errorf("%s: no answer within %s; log: %s", file, timeout, p.logTail())
			}
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s: not mounted within %s; log: %s", mnt, timeout, p.logTail())
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// abortFUSE aborts the FUSE connection of the mount at mnt (its pending
// and future requests fail with ENOTCONN), through the fusectl file
// system, mounting that first if needed. The connection is named by the
// mount's device, taken from /proc/self/mountinfo: a stat of a stalled
// mount would wait for the server too.
func abortFUSE(mnt string) {
	minor, ok := mountMinor(mnt)
	if !ok {
		return
	}
	ctl := "/sys/fs/fuse/connections"
	if _, ok, _ := fs.MountType(ctl); !ok {
		_ = unix.Mount("fusectl", ctl, "fusectl", 0, "")
	}
	if err := os.WriteFile(filepath.Join(ctl, minor, "abort"), []byte("1"), 0); err != nil {
		fmt.Printf("  ! abort the FUSE connection of %s: %v\n", mnt, err)
	}
}

// mountMinor returns the minor device number of the topmost mount at mnt
// (a clean absolute path without characters that mountinfo escapes).
func mountMinor(mnt string) (string, bool) {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return "", false
	}
	minor, ok := "", false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) > 4 && f[4] == mnt {
			if _, m, found := strings.Cut(f[2], ":"); found {
				minor, ok = m, true
			}
		}
	}
	return minor, ok
}

// lazyUnmount detaches whatever is still mounted on mnt.
func lazyUnmount(mnt string) {
	for i := 0; i < 5; i++ {
		if _, ok, _ := fs.MountType(mnt); !ok {
			return
		}
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			fmt.Printf("  ! lazy unmount %s: %v\n", mnt, err)
			return
		}
	}
}

// ddRun copies file to /dev/null with dd bs=1M and returns the wall time.
// A dd whose bytes read (/proc/PID/io rchar) stay put for nbdStall counts
// as stalled: it is killed, and if it does not die (a FUSE read waits for
// its reply) abort is called, which must fail its pending read.
func (ps *procSet) ddRun(file string, timeout time.Duration, abort func()) outcome {
	p, err := ps.start(nil, "dd", "if="+file, "of=/dev/null", "bs=1M")
	if err != nil {
		return outcome{err: err}
	}
	giveUp := func(o outcome) outcome {
		_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
			abort()
			<-p.done
		}
		return o
	}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	deadline := time.After(timeout)
	last, lastMove := int64(-1), time.Now()
	for {
		select {
		case <-p.done:
			if p.err != nil {
				return outcome{err: fmt.Errorf("dd %s: %v: %s", file, p.err, p.logTail())}
			}
			return outcome{value: time.Since(p.start).Seconds()}
		case <-deadline:
			return giveUp(outcome{err: fmt.Errorf("dd %s: not done after %s (%d MiB read)", file, timeout, last>>20)})
		case <-tick.C:
			n := readChars(p.cmd.Process.Pid)
			if n != last {
				last, lastMove = n, time.Now()
			} else if time.Since(lastMove) > nbdStall {
				return giveUp(outcome{stalled: true, err: fmt.Errorf("dd %s: stalled after %d MiB", file, n>>20)})
			}
		}
	}
}

// readChars is the rchar of /proc/PID/io: the bytes the process has read.
func readChars(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/io", pid))
	if err != nil {
		return -1
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "rchar:"); ok {
			n, _ := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
			return n
		}
	}
	return -1
}

// table renders the FUSE results as one markdown table and counts the
// targets met.
func (fb *fuseBench) table() (string, int, int) {
	var sb strings.Builder
	sb.WriteString("| test | image | latency | snapfs FUSE | snapfs NBD | peer | FUSE / NBD | FUSE / peer | target | met? |\n")
	sb.WriteString("|---|---|---|---|---|---|---|---|---|---|\n")
	met, targets := 0, 0
	get := func(k rkey) *samples {
		if s := fb.res[k]; s != nil {
			return s
		}
		return &samples{}
	}
	verdict := func(s *samples, r, want float64) string {
		targets++
		switch {
		case s.stalls > 0 || s.fails > 0:
			return "**NO**"
		case math.IsNaN(r):
			return "n/a"
		case r >= want:
			met++
			return "yes"
		}
		return "**NO**"
	}
	for _, test := range fuseTests {
		for _, img := range fb.imgs {
			for _, lat := range fb.p.latencies {
				k := func(who string) rkey { return rkey{test, img.name, lat, who} }
				f, n, q := get(k(wFUSE)), get(k(wNBD)), get(k(wPeer))
				var fv, nv, qv float64
				target, m := "-", "-"
				switch test {
				case fSeq:
					mbps := func(x *samples) float64 { return float64(img.obj) / 1e6 / medianF(x.vals) }
					fv, nv, qv = mbps(f), mbps(n), mbps(q)
					target = ">= 0.7 x NBD; >= 3 x peer"
					m = verdict(f, fv/nv, 0.7) + "; " + verdict(f, fv/qv, 3)
				case fRand1, fRand32:
					fv, nv, qv = medianF(f.vals), math.NaN(), medianF(q.vals)
				case fRSS:
					fv, nv, qv = maxF(f.vals)/(1<<20), math.NaN(), maxF(q.vals)/(1<<20)
				}
				fmt.Fprintf(&sb, "| %s | %s | %d ms | %s | %s | %s | %s | %s | %s | %s |\n", test, img.name, lat,
					cellStr(fv, f), cellStr(nv, n), cellStr(qv, q), num(fv/nv, 2), num(fv/qv, 2), target, m)
			}
		}
	}
	for _, lat := range fb.p.latencies {
		var st [3]int
		for k, s := range fb.res {
			if k.lat != lat {
				continue
			}
			switch k.who {
			case wFUSE:
				st[0] += s.stalls
			case wNBD:
				st[1] += s.stalls
			case wPeer:
				st[2] += s.stalls
			}
		}
		m := "yes"
		if st[0]+st[1] > 0 {
			m = "**NO**"
		} else {
			met++
		}
		targets++
		fmt.Fprintf(&sb, "| stalled runs | all | %d ms | %d | %d | %d | - | - | 0 for snapfs | %s |\n", lat, st[0], st[1], st[2], m)
	}
	return sb.String(), met, targets
}

func (fb *fuseBench) legend() string {
	var sb strings.Builder
	fmt.Fprintf(&sb, "\nsnapfs FUSE: `snapfs mount s3://bench/KEY DIR --cache-size %d` through the proxy, a fresh process (and mount) per run, reading DIR/KEY.raw. ", fb.p.coldCache)
	sb.WriteString("snapfs NBD: `snapfs serve` on the same object, a fresh process, read by nbdcopy (its defaults: 4 connections, 64 requests each, to null:), as in BenchmarkNBD. ")
	sb.WriteString("peer: nbdfuse -r (its defaults) on qemu-nbd -r -e 8 reading the object over http (qemu's curl driver, defaults) through the same proxy, both fresh per run; its RSS is the sum of the two. ")
	sb.WriteString("Sequential: dd if=FILE of=/dev/null bs=1M (every run is a new mount; snapfs opens its files for direct I/O, so the kernel's page cache is in the peer's path only), MB/s of object bytes over dd's wall time. ")
	sb.WriteString("Random: fio 4 KiB randread over the whole file, --norandommap, buffered (direct=0: the peer's page cache in the path, fio's fadvise(RANDOM) turns its readahead off); QD1 with psync, QD32 with io_uring. ")
	sb.WriteString("Cells are medians over rounds (RSS: the maximum). ")
	fmt.Fprintf(&sb, "A run stalls when it makes no progress for %s (dd: its rchar in /proc/PID/io; fio: its per-second IOPS log); a stalled run is killed, its mount aborted and lazily unmounted; stalled and failed runs count in the cells as (Ns/Nf).\n", nbdStall)
	return sb.String()
}
