package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path"
	"runtime/debug"
	"strings"

	"github.com/dustin/go-humanize"
	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// deviceFlags tune the lazy devices that serve and mount expose.
func deviceFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "cache-size", Value: "512MiB", Usage: "memory cache of decoded blocks, shared by all images"},
		&cli.StringFlag{Name: "min-get", Usage: "least bytes one demand fetch reads (default: disk.DefaultMinFetch)"},
		&cli.IntFlag{Name: "max-inflight", Usage: "fetches in flight per image (default: disk.DefaultMaxInFlight)"},
	}
}

// devices opens lazy devices over images, sharing one memory cache (the
// --cache-size budget holds for all images together) and one set of counters.
type devices struct {
	mem     *cache.Memory
	stats   *disk.Stats
	metrics *objstore.Metrics
	opts    disk.Options
}

// parseBytes reads a size such as "512MiB", "1G" or "65536".
func parseBytes(flag, s string) (int64, error) {
	n, err := humanize.ParseBytes(s)
	if err != nil || n > 1<<62 {
		return 0, fmt.Errorf("--%s %q: not a size", flag, s)
	}
	return int64(n), nil
}

// newDevices builds the shared cache and counters from the flags.
func newDevices(c *cli.Context) (*devices, error) {
	d := &devices{stats: &disk.Stats{}, metrics: &objstore.Metrics{}}
	size, err := parseBytes("cache-size", c.String("cache-size"))
	if err != nil {
		return nil, err
	}
	if size > 0 {
		// Read-ahead held for sequential readers comes out of the same
		// budget: the cache gets the rest (all of a budget too small to
		// share).
		keep := disk.DefaultKeep(size)
		if size-keep < 4*disk.DefaultMaxWindow {
			keep = 0
		}
		d.opts.Keep = disk.NewKeepBudget(keep)
		if d.mem, err = cache.NewMemory(size - keep); err != nil {
			return nil, err
		}
	}
	setGC(size)
	if s := c.String("min-get"); s != "" {
		if d.opts.MinFetch, err = parseBytes("min-get", s); err != nil {
			return nil, err
		}
	}
	d.opts.MaxInFlight = c.Int("max-inflight")
	d.opts.Cache, d.opts.Stats, d.opts.Metrics = d.mem, d.stats, d.metrics
	return d, nil
}

// gcPercent is the GOGC that serving and exporting processes use unless
// GOGC is set. The memory tier's blocks live outside the Go heap (cache's
// arena), so what GOGC bounds now is the churn of fetch, reply and part
// buffers: for export, 121 MiB peak RSS at 100 against 96 MiB at 25 (512
// MiB of random data into MinIO, same time); for serve, no difference was
// measured since the arena (before it, with the cache on the heap, 1.52 GB
// at 100 against about 1.0 GB at 25 for a 512 MiB cache).
const gcPercent = 25

// setGC tunes the garbage collector for a cache of cacheSize bytes.
func setGC(cacheSize int64) {
	if os.Getenv("GOGC") == "" && cacheSize > 0 {
		debug.SetGCPercent(gcPercent)
	}
}

// store opens the store behind rawURL, counted in the shared metrics.
func (d *devices) store(c *cli.Context, rawURL string) (objstore.Store, string, error) {
	return openStoreWith(c, rawURL, d.metrics)
}

// open returns the lazy device of the image at key in st; closing the
// device closes the image.
func (d *devices) open(ctx context.Context, st objstore.Store, key string) (*disk.Disk, error) {
	return disk.Open(ctx, st, key, nil, d.opts)
}

// close releases the shared cache.
func (d *devices) close() {
	if d.mem != nil {
		d.mem.Close()
	}
}

// found is one object under a prefix: an image opened, or why not.
type found struct {
	key    string
	dev    *disk.Disk
	reason error // set when the object is not served
}

// openAll opens every QCOW2 image under prefix. Objects that are not
// QCOW2 come back with qcow2.ErrNotQCOW2, refused images with their reason.
func (d *devices) openAll(ctx context.Context, st objstore.Store, prefix string) ([]found, error) {
	objs, err := st.List(ctx, prefix)
	if err != nil {
		return nil, err
	}
	var out []found
	for _, o := range objs {
		if strings.HasSuffix(o.Key, "/") {
			continue
		}
		dev, err := d.open(ctx, st, o.Key)
		if err != nil && !errors.Is(err, qcow2.ErrNotQCOW2) && !errors.Is(err, qcow2.ErrUnsupported) && !errors.Is(err, qcow2.ErrCorrupt) {
			return nil, err
		}
		out = append(out, found{key: o.Key, dev: dev, reason: err})
	}
	return out, nil
}

// exportName names the image at key for NBD: its path below prefix.
func exportName(prefix, key string) string {
	if prefix == "" || !strings.HasPrefix(key, prefix) {
		return path.Base(key)
	}
	return strings.TrimPrefix(key, prefix)
}

// logSkipped logs objects that are not served, once each.
func logSkipped(fs []found) {
	for _, f := range fs {
		switch {
		case f.reason == nil:
		case errors.Is(f.reason, qcow2.ErrNotQCOW2):
			slog.Warn("not a QCOW2 image, left out", "object", f.key)
		default:
			slog.Warn("image left out", "object", f.key, "reason", f.reason)
		}
	}
}
