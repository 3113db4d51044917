package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"strings"
	"syscall"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/fs"
	"github.com/snapfs/snapfs/nbd"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

func importCommand() *cli.Command {
	return &cli.Command{
		Name:      "import",
		Usage:     "copy an image into a local volume (a sparse file or a block device), usable at once",
		ArgsUsage: "URL TARGET",
		Description: "Fills TARGET with the raw disk in the background (large ranged GETs in the object's " +
			"order, zero and unallocated ranges left as holes) and records progress in a state file " +
			"beside it, so that a restart resumes. With --serve the volume is exported (NBD) or mounted " +
			"(FUSE) at once, writable: reads of ranges not yet local are fetched first. At the end the " +
			"volume is checked against the object's snapfs-raw-sha256 metadata when it has one and " +
			"recorded complete; without --serve the command then exits 0.",
		Flags: withGlobal(append(volumeFlags(),
			&cli.StringFlag{Name: "serve", Usage: "expose the volume while it fills: nbd or fuse"},
			&cli.StringFlag{Name: "listen", Value: "127.0.0.1:10809", Usage: "TCP `ADDR` of the NBD server (--serve nbd)"},
			&cli.StringFlag{Name: "socket", Usage: "unix socket `PATH` of the NBD server (--serve nbd)"},
			&cli.StringFlag{Name: "mountpoint", Usage: "`DIR` to mount the volume on (--serve fuse)"},
			&cli.BoolFlag{Name: "writable", Value: true, Usage: "let clients write (--serve)"},
			&cli.StringFlag{Name: "bandwidth", Usage: "cap the background copy at `RATE` bytes per second (e.g. 50MiB)"},
			&cli.IntFlag{Name: "jobs", Aliases: []string{"j"}, Value: disk.DefaultHydrateWorkers, Usage: "reads in flight"},
			&cli.StringFlag{Name: "chunk", Value: "8MiB", Usage: "guest bytes per read"},
			&cli.StringFlag{Name: "metrics", Usage: "serve Prometheus metrics and Go's profiler at http://`ADDR`/"},
			&cli.BoolFlag{Name: "progress", Usage: "show a progress bar (default: when stderr is a terminal)"},
			&cli.StringFlag{Name: "flush-batch", Hidden: true, Usage: "newly local bytes that make the state file be written (default 32MiB; also every second)"},
		)...),
		Action: runImport,
	}
}

func runImport(c *cli.Context) error {
	if c.NArg() != 2 {
		return cli.Exit("import takes a URL and a TARGET (see snapfs import --help)", 2)
	}
	u, target := c.Args().Get(0), c.Args().Get(1)
	opts := disk.HydrateOptions{Workers: c.Int("jobs")}
	var err error
	if s := c.String("bandwidth"); s != "" {
		if opts.Bandwidth, err = parseBytes("bandwidth", strings.TrimSuffix(s, "/s")); err != nil {
			return cli.Exit(err.Error(), 2)
		}
	}
	if opts.Chunk, err = parseBytes("chunk", c.String("chunk")); err != nil {
		return cli.Exit(err.Error(), 2)
	}
	serve := c.String("serve")
	switch serve {
	case "", "nbd":
	case "fuse":
		if c.String("mountpoint") == "" {
			return cli.Exit("--serve fuse needs --mountpoint DIR", 2)
		}
	default:
		return cli.Exit(fmt.Sprintf("--serve %q: want nbd or fuse", serve), 2)
	}

	metrics := &objstore.Metrics{}
	st, key, err := openStoreWith(c, u, metrics)
	if err != nil {
		return err
	}
	v, err := openVolume(c, st, key, target, serve != "" && c.Bool("writable"), metrics)
	if err != nil {
		return err
	}
	defer v.Close()
	if addr := c.String("metrics"); addr != "" {
		// The store's counters; hydration reads the image directly, not
		// through the Disk's counters.
		if err := serveMetrics(addr, &devices{stats: &disk.Stats{}, metrics: metrics}); err != nil {
			return err
		}
	}
	vol := v.dev.Volume()
	if vol.Complete() && serve == "" {
		fmt.Fprintf(os.Stderr, "snapfs: %s is already complete (%s)\n", target, st.URL(key))
		return nil
	}

	var bar *progressbar.ProgressBar
	if c.Bool("progress") || (!c.IsSet("progress") && term.IsTerminal(int(os.Stderr.Fd()))) {
		bar = progressbar.DefaultBytes(-1, "importing")
	}
	opts.Progress = func(done, total int64) {
		if bar != nil {
			bar.ChangeMax64(total)
			_ = bar.Set64(done)
		}
	}
	start := time.Now()
	before := vol.PresentBytes()
	hydrate := func() error {
		err := v.hydrate(c.Context, opts)
		if bar != nil {
			_ = bar.Finish()
			fmt.Fprintln(os.Stderr)
		}
		if err != nil {
			return fmt.Errorf("import into %s stopped (%s keeps the progress; run the same command again to resume): %w", target, vol.StatePath(), err)
		}
		ms := metrics.Snapshot()
		slog.Info("import complete", "source", st.URL(key), "volume", target,
			"copied", vol.PresentBytes()-before, "fetched", ms.BytesRead, "gets", ms.Gets, "seconds", time.Since(start).Seconds())
		fmt.Fprintf(os.Stderr, "snapfs: %s complete: %s, %s fetched in %d GETs, %.1fs\n",
			target, humanSize(vol.Size()), humanSize(ms.BytesRead), ms.Gets, time.Since(start).Seconds())
		return nil
	}

	switch serve {
	case "":
		return hydrate()
	case "nbd":
		done := make(chan error, 1)
		go func() {
			if err := hydrate(); err != nil {
				done <- err
			}
		}()
		name := exportName("", key)
		return serveNBD(c, []nbd.Export{{Name: name, Description: st.URL(key), Device: v.dev}}, done)
	default:
		return importFUSE(c, st, key, v, hydrate)
	}
}

// importFUSE mounts the volume's device at --mountpoint while hydrate
// runs, until a signal or an unmount; a failed hydration unmounts and
// returns its error.
func importFUSE(c *cli.Context, st objstore.Store, key string, v *localVolume, hydrate func() error) error {
	m, err := mountVolume(c, st, key, v, c.String("mountpoint"))
	if err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() {
		if err := hydrate(); err != nil {
			done <- err
		}
	}()
	var herr error
	select {
	case <-m.Done():
		return m.Wait()
	case herr = <-done:
	case <-c.Context.Done():
	}
	ctx, cancel := context.WithTimeout(context.Background(), unmountGrace)
	defer cancel()
	if err := m.Unmount(ctx); err != nil {
		slog.Warn("exiting with files still open on the detached mount; they fail from now on", "mountpoint", m.Dir(), "err", err)
	}
	return herr
}

// mountVolume mounts the volume's device at dir, as a directory holding
// the image's raw file (named as snapfs mount names it). The file is the
// device itself, of the volume's size: the mount lists nothing, so that a
// complete volume is served with the bucket gone.
func mountVolume(c *cli.Context, st objstore.Store, key string, v *localVolume, dir string) (*fs.Mount, error) {
	vol := v.dev.Volume()
	fixed := &fs.FixedFile{Device: sharedDevice{v.dev}, ETag: vol.Source().ETag, Allocated: vol.Size()}
	if fi, err := os.Stat(vol.StatePath()); err == nil {
		fixed.ModTime = fi.ModTime()
	}
	if v.im != nil {
		fixed.ModTime = v.info.LastModified
		if ext, err := v.im.Map(c.Context, 0, v.im.Size()); err == nil {
			fixed.Allocated = 0
			for _, e := range ext {
				if e.Kind == qcow2.Data || e.Kind == qcow2.Compressed {
					fixed.Allocated += e.Length
				}
			}
		}
	} else if fi, err := os.Stat(vol.Target()); err == nil {
		if sys, ok := fi.Sys().(*syscall.Stat_t); ok && !vol.BlockDevice() {
			fixed.Allocated = min(sys.Blocks*512, vol.Size())
		}
	}
	opts := fs.Options{
		UID:      uint32(os.Getuid()),
		GID:      uint32(os.Getgid()),
		ListTTL:  -1,
		Logger:   slog.Default(),
		Writable: !v.dev.ReadOnly(),
		Fixed:    fixed,
	}
	fsys, err := fs.New(c.Context, st, key, opts)
	if err != nil {
		return nil, err
	}
	m, err := fsys.Mount(dir, st.URL(key))
	if err != nil {
		fsys.Close()
		return nil, err
	}
	slog.Info("mounted", "source", st.URL(key), "volume", vol.Target(), "mountpoint", m.Dir())
	return m, nil
}
