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
		&cli.StringFlag{Name: "cache-size", Value: "512MiB", Usage: "memory for decoded blocks, cached and in flight, shared by all images"},
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
		// So do the buffers of fetches, compressed reads and replies in
		// flight, which live on the Go heap (inFlightReserve).
		keep, reserve := disk.DefaultKeep(size), inFlightReserve(size)
		if size-keep-reserve < 4*disk.DefaultMaxWindow {
			keep, reserve = 0, 0
		}
		d.opts.Keep = disk.NewKeepBudget(keep)
		if d.mem, err = cache.NewMemory(size - keep - reserve); err != nil {
			return nil, err
		}
		setMemoryLimit(size, size-keep-reserve, keep)
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

// inFlightReserve is the part of a --cache-size budget of size bytes left
// out of the memory tier for the buffers in flight: an eighth, at most 64
// MiB. Measured on a cold nbdcopy of the zlib benchmark image through a
// 512 MiB budget: fetch and kept buffers 43 MB, compressed groups 78 MB,
// NBD replies 30 MB on the heap beside the tier's 448 MiB, for a peak RSS
// of 665-680 MiB; the process stays within the budget plus 100 MiB only
// if the tier gives up about that much.
func inFlightReserve(size int64) int64 { return min(size/8, 64<<20) }

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

// heapSlack is what the process may hold beyond --cache-size: the Go
// runtime's own memory, idle heap not yet returned, the binary.
const heapSlack = 100 << 20

// inFlightMax is about the most the buffers in flight may hold beside
// kept read-ahead, whatever the budget: NBD replies (nbd's 32 MiB), fetches
// (8 of 4 MiB and 24 of MinFetch) and their compressed groups.
const inFlightMax = 128 << 20

// setMemoryLimit makes the Go heap the rest of a --cache-size budget of
// size bytes beside an arena of arena bytes, plus heapSlack less 20 MiB
// for what the runtime does not count (the binary, C libraries), unless
// GOMEMLIMIT is set. The limit only makes the collector run earlier, and
// return idle memory sooner, when a burst of buffers would take the
// process past size+heapSlack; it is never set below what the buffers in
// flight and keep bytes of kept read-ahead may hold, where the collector
// would run without end. (So with budgets under 512 MiB the process may
// exceed size+heapSlack: the buffers in flight do not shrink with it.)
func setMemoryLimit(size, arena, keep int64) {
	if os.Getenv("GOMEMLIMIT") == "" && size > 0 {
		debug.SetMemoryLimit(max(size-arena+heapSlack-20<<20, inFlightMax+keep))
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
		if err != nil && !qcow2.Refused(err) {
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
