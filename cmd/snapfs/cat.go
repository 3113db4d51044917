package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/sync/errgroup"
	"golang.org/x/term"

	"github.com/snapfs/snapfs/internal/zeros"
	"github.com/snapfs/snapfs/qcow2"
)

func catCommand() *cli.Command {
	return &cli.Command{
		Name:      "cat",
		Usage:     "write the raw disk content of an image to stdout or a file",
		ArgsUsage: "URL",
		Description: "Reads with parallel ranged GETs of at least --chunk bytes, one GET per " +
			"host-contiguous run. Into a file (-o), unallocated and zero ranges stay holes.",
		Flags: withGlobal(
			&cli.StringFlag{Name: "output", Aliases: []string{"o"}, Usage: "write to `FILE` (sparse) instead of stdout"},
			&cli.IntFlag{Name: "jobs", Aliases: []string{"j"}, Value: 8, Usage: "reads in flight"},
			&cli.Int64Flag{Name: "chunk", Value: 8 << 20, Usage: "guest bytes per read (at least 4 MiB)"},
			&cli.BoolFlag{Name: "progress", Usage: "show a progress bar (default: when stderr is a terminal)"},
		),
		Action: withImage(runCat),
	}
}

// minCatChunk is the smallest read cat issues: small GETs waste round trips.
const minCatChunk = 4 << 20

// catJob is one guest range to copy, and where its bytes go when ready.
type catJob struct {
	off, n int64
	buf    []byte
	done   chan error
}

func runCat(c *cli.Context, im *qcow2.Image) error {

	chunk := max(c.Int64("chunk"), minCatChunk)
	if cs := im.ClusterSize(); chunk%cs != 0 {
		chunk += cs - chunk%cs
	}
	jobs := max(c.Int("jobs"), 1)

	var out *os.File
	var err error
	toFile := c.String("output") != ""
	if toFile {
		out, err = os.OpenFile(c.String("output"), os.O_RDWR|os.O_CREATE|os.O_TRUNC, 0o644)
		if err != nil {
			return err
		}
	} else {
		out = os.Stdout
	}

	var bar *progressbar.ProgressBar
	if c.Bool("progress") || (!c.IsSet("progress") && term.IsTerminal(int(os.Stderr.Fd()))) {
		bar = progressbar.DefaultBytes(im.Size(), "reading")
	}
	var copied atomic.Int64
	progress := func(n int64) {
		copied.Add(n)
		if bar != nil {
			_ = bar.Add64(n)
		}
	}

	start := time.Now()
	if toFile {
		err = catToFile(c, im, out, chunk, jobs, progress)
		if cerr := out.Close(); err == nil {
			err = cerr
		}
	} else {
		err = catToStream(c.Context, im, out, chunk, jobs, progress)
	}
	if bar != nil {
		_ = bar.Finish()
	}
	if err != nil {
		return err
	}
	if bar != nil {
		el := time.Since(start).Seconds()
		fmt.Fprintf(os.Stderr, "%s: %s in %.1fs (%.0f MB/s)\n", im.URL(), humanSize(im.Size()), el, float64(im.Size())/el/1e6)
	}
	return nil
}

// catToFile copies only the allocated extents into f, from several workers,
// and sizes f to the virtual size, so that the rest stays holes.
func catToFile(c *cli.Context, im *qcow2.Image, f *os.File, chunk int64, jobs int, progress func(int64)) error {
	g, ctx := errgroup.WithContext(c.Context)
	work := make(chan [2]int64, jobs)
	bufs := sync.Pool{New: func() any { b := make([]byte, chunk); return &b }}
	for range jobs {
		g.Go(func() error {
			for r := range work {
				bp := bufs.Get().(*[]byte)
				buf := (*bp)[:r[1]]
				if _, err := im.ReadAtContext(ctx, buf, r[0]); err != nil {
					return err
				}
				if err := writeSparse(f, buf, r[0]); err != nil {
					return err
				}
				bufs.Put(bp)
				progress(r[1])
			}
			return nil
		})
	}
	g.Go(func() error {
		defer close(work)
		var last int64
		err := walkExtents(c, im, func(e qcow2.Extent) {
			if e.Kind != qcow2.Data && e.Kind != qcow2.Compressed {
				return
			}
			for off := e.Start; off < e.Start+e.Length; off += chunk {
				n := min(chunk, e.Start+e.Length-off)
				select {
				case work <- [2]int64{off, n}:
				case <-ctx.Done():
					return
				}
			}
			progress(e.Start - last)
			last = e.Start + e.Length
		})
		progress(im.Size() - last)
		return err
	})
	if err := g.Wait(); err != nil {
		return err
	}
	if err := f.Truncate(im.Size()); err != nil {
		return err
	}
	return c.Context.Err()
}

// sparseBlock is the granularity at which cat leaves all-zero data unwritten.
const sparseBlock = 4096

// writeSparse writes p at off in f, skipping aligned all-zero blocks.
func writeSparse(f *os.File, p []byte, off int64) error {
	for len(p) > 0 {
		n := min(len(p), sparseBlock-int(off%sparseBlock))
		if !zeros.Is(p[:n]) {
			// Extend the run over following non-zero blocks: fewer syscalls.
			for n < len(p) {
				m := min(len(p)-n, sparseBlock)
				if zeros.Is(p[n : n+m]) {
					break
				}
				n += m
			}
			if _, err := f.WriteAt(p[:n], off); err != nil {
				return err
			}
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// catToStream copies the whole virtual disk to w in order, reading ahead
// with several workers.
func catToStream(ctx context.Context, im *qcow2.Image, w io.Writer, chunk int64, jobs int, progress func(int64)) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	bw := bufio.NewWriterSize(w, 1<<20)
	queue := make(chan *catJob, jobs)
	work := make(chan *catJob, jobs)
	free := make(chan []byte, 2*jobs)
	for range 2 * jobs {
		free <- make([]byte, chunk)
	}
	var wg sync.WaitGroup
	for range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range work {
				_, err := im.ReadAtContext(ctx, j.buf[:j.n], j.off)
				j.done <- err
			}
		}()
	}
	go func() {
		defer close(queue)
		defer close(work)
		for off := int64(0); off < im.Size(); off += chunk {
			var buf []byte
			select {
			case buf = <-free:
			case <-ctx.Done():
				return
			}
			j := &catJob{off: off, n: min(chunk, im.Size()-off), buf: buf, done: make(chan error, 1)}
			queue <- j
			work <- j
		}
	}()
	var err error
	for j := range queue {
		if err == nil {
			if err = <-j.done; err == nil {
				if _, err = bw.Write(j.buf[:j.n]); err == nil {
					progress(j.n)
				}
			}
			if err != nil {
				cancel()
			}
		}
		free <- j.buf
	}
	wg.Wait()
	if err != nil {
		return err
	}
	if err := bw.Flush(); err != nil {
		return err
	}
	return ctx.Err()
}
