package main

import (
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/pprof"
	"strconv"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"

	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// Object metadata keys export sets (lower case, without x-amz-meta-).
const (
	metaVirtualSize = "snapfs-virtual-size"
	metaRawSHA256   = "snapfs-raw-sha256"
	metaSource      = "snapfs-source"
)

// exportUploads is the number of parts uploaded at once.
const exportUploads = 4

func exportCommand() *cli.Command {
	return &cli.Command{
		Name:      "export",
		Usage:     "write a raw disk (file, block device or stdin) as a QCOW2 object, in one pass",
		ArgsUsage: "SOURCE URL",
		Description: "SOURCE is a raw file, a block device, or - for stdin (with --size). The image " +
			"is streamed into a multipart upload (part 1, holding the header, is sent last), so no " +
			"temporary file is needed and memory does not grow with the data. Any failure or " +
			"interrupt aborts the upload: the object appears only whole.",
		Flags: withGlobal(
			&cli.StringFlag{Name: "cluster-size", Value: "64KiB", Usage: "cluster size, a power of two from 512 to 2MiB"},
			&cli.StringFlag{Name: "compress", Value: "none", Usage: "none, zlib or zstd"},
			&cli.IntFlag{Name: "jobs", Aliases: []string{"j"}, Value: runtime.NumCPU(), Usage: "compression workers"},
			&cli.StringSliceFlag{Name: "meta", Usage: "add object metadata `KEY=VALUE` (repeatable)"},
			&cli.StringFlag{Name: "compat", Value: "1.1", Usage: "1.1 (QCOW2 version 3) or 0.10 (version 2)"},
			&cli.StringFlag{Name: "size", Usage: "size of the source in bytes (required for stdin)"},
			&cli.BoolFlag{Name: "progress", Usage: "show a progress bar (default: when stderr is a terminal)"},
			&cli.StringFlag{Name: "part-size", Value: "8MiB", Usage: "size of the upload parts (at least 5MiB; raised for sources too large for 10000 parts)"},
			&cli.IntFlag{Name: "uploads", Value: exportUploads, Usage: "parts uploaded at once"},
			&cli.StringFlag{Name: "cpuprofile", Hidden: true, Usage: "write a Go CPU profile of the export to `FILE`"},
		),
		Action: runExport,
	}
}

// parseClusterSize reads a cluster size: bytes, or with a binary suffix
// (512, 4k, 64K, 64KiB, 2M, 2MiB).
func parseClusterSize(s string) (int, error) {
	t := strings.TrimSuffix(strings.TrimSuffix(strings.TrimSpace(s), "B"), "i")
	mult := 1
	switch {
	case strings.HasSuffix(t, "k") || strings.HasSuffix(t, "K"):
		mult, t = 1<<10, t[:len(t)-1]
	case strings.HasSuffix(t, "m") || strings.HasSuffix(t, "M"):
		mult, t = 1<<20, t[:len(t)-1]
	}
	n, err := strconv.Atoi(t)
	if err != nil || n <= 0 || n > (4<<20)/mult {
		return 0, fmt.Errorf("--cluster-size %q: not a size", s)
	}
	return n * mult, nil
}

// parseMeta reads --meta KEY=VALUE pairs into meta; keys are lower-cased
// and must be letters, digits, '-' or '_'.
func parseMeta(pairs []string, meta map[string]string) error {
	for _, p := range pairs {
		k, v, ok := strings.Cut(p, "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok || k == "" {
			return fmt.Errorf("--meta %q: want KEY=VALUE", p)
		}
		for _, r := range k {
			if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-' || r == '_') {
				return fmt.Errorf("--meta %q: a key is letters, digits, '-' and '_'", p)
			}
		}
		if k == metaRawSHA256 || k == metaVirtualSize {
			return fmt.Errorf("--meta %q: %s is set by export", p, k)
		}
		meta[k] = v
	}
	return nil
}

func runExport(c *cli.Context) error {
	if c.NArg() != 2 {
		return cli.Exit("export takes SOURCE and URL (see snapfs export --help)", 2)
	}
	srcPath, target := c.Args().Get(0), c.Args().Get(1)
	cs, err := parseClusterSize(c.String("cluster-size"))
	if err != nil {
		return cli.Exit(err.Error(), 2)
	}
	stdinSize := int64(-1)
	if c.IsSet("size") {
		if stdinSize, err = parseBytes("size", c.String("size")); err != nil {
			return cli.Exit(err.Error(), 2)
		}
	}
	opts := qcow2.StreamOptions{
		WriteOptions: qcow2.WriteOptions{ClusterSize: cs, Compat: c.String("compat")},
		Compression:  c.String("compress"),
		Jobs:         max(c.Int("jobs"), 1),
	}
	meta := map[string]string{}
	if err := parseMeta(c.StringSlice("meta"), meta); err != nil {
		return cli.Exit(err.Error(), 2)
	}

	src, err := openRawSource(srcPath, stdinSize)
	if err != nil {
		return err
	}
	defer src.Close()
	if err := opts.Validate(src.size); err != nil {
		return cli.Exit(fmt.Sprintf("export of %s: %v", src.name, err), 2)
	}
	vsize := (src.size + 511) &^ 511
	if srcPath == "-" {
		meta[metaSource] = "stdin"
	} else if abs, err := filepath.Abs(srcPath); err == nil {
		meta[metaSource] = abs
	}
	meta[metaVirtualSize] = strconv.FormatInt(vsize, 10)

	// The raw backend replaces the metadata at the end; parts and
	// completion go through retries.
	if gSet(c, "log-level") {
		if err := setupLogging(c); err != nil {
			return err
		}
	}
	raw, key, err := objstore.Open(c.Context, target, storeConfig(c))
	if err != nil {
		return err
	}
	if key == "" || strings.HasSuffix(key, "/") {
		return fmt.Errorf("%s: names a prefix, not an object", raw.URL(key))
	}
	st := objstore.WithRetry(raw, objstore.RetryPolicy{MaxAttempts: max(gInt(c, "retries"), 1), MaxDelay: 5 * time.Second})
	url := st.URL(key)

	// Parts: an image is at most the source plus its metadata.
	estimate := vsize + vsize/int64(cs/8) + 64<<20
	minPart, err := parseBytes("part-size", c.String("part-size"))
	if err != nil {
		return cli.Exit(err.Error(), 2)
	}
	partSize := objstore.PartSizeFor(estimate, minPart)
	opts.HeadSize = partSize

	var bar *progressbar.ProgressBar
	if c.Bool("progress") || (!c.IsSet("progress") && term.IsTerminal(int(os.Stderr.Fd()))) {
		bar = progressbar.DefaultBytes(vsize, "reading")
		var shown int64
		opts.Progress = func(read, written int64) {
			_ = bar.Set64(read)
			if written-shown >= 16<<20 {
				shown = written
				bar.Describe("reading, " + humanSize(written) + " written")
			}
		}
	}

	// The part buffers are reused, but the HTTP client's garbage would let
	// the heap double them at the default GOGC: 121 MiB peak RSS against
	// 96 MiB at 25 for 512 MiB of random data into MinIO, same time.
	if os.Getenv("GOGC") == "" {
		debug.SetGCPercent(gcPercent)
	}
	if path := c.String("cpuprofile"); path != "" {
		f, err := os.Create(path)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer pprof.StopCPUProfile()
	}
	start := time.Now()
	// S3 takes metadata only when an upload starts. A file or device is
	// hashed first, so that the object appears whole with its digest; that
	// read also records a CRC-32C per MiB, against which the stream checks
	// its own read (a source that changed in between aborts the upload)
	// instead of hashing it again. stdin can be read once only, so its
	// digest is set after the upload by a server-side copy of the object
	// onto itself.
	hashedFirst := src.f != os.Stdin
	if hashedFirst {
		// The hash reads the whole source: learn first that the bucket is
		// there, not after an hour of reading. A store that forbids
		// listing may still take the upload.
		if _, err := st.List(c.Context, key); err != nil && !errors.Is(err, objstore.ErrForbidden) {
			return fmt.Errorf("export to %s: %w", url, err)
		}
		sums := &qcow2.SourceSums{}
		sum, err := digestRaw(c.Context, src, sums)
		if err == nil {
			_, err = src.f.Seek(0, io.SeekStart)
		}
		if err != nil {
			return fmt.Errorf("export of %s: hashing the source: %w", src.name, err)
		}
		meta[metaRawSHA256] = sum
		opts.ExpectSums = sums
	}
	hashed := time.Since(start)
	up, err := objstore.NewUpload(c.Context, st, key, objstore.UploadOptions{PartSize: partSize, Parallel: max(c.Int("uploads"), 1), Meta: meta})
	if err != nil {
		return fmt.Errorf("export to %s: %w", url, err)
	}
	stats, err := qcow2.WriteStream(c.Context, up, src.reader(), src.size, opts)
	if bar != nil {
		_ = bar.Finish()
	}
	if err != nil {
		if errors.Is(err, c.Context.Err()) && c.Context.Err() != nil {
			err = fmt.Errorf("interrupted: %w", err)
		}
		fmt.Fprintf(os.Stderr, "snapfs: export to %s failed: %v; aborting the upload\n", url, err)
		err = up.Abort(err)
		return fmt.Errorf("export of %s to %s failed, the upload was aborted and no object written: %w", src.name, url, err)
	}
	digest := hex.EncodeToString(stats.RawSHA256[:])
	if hashedFirst {
		digest = meta[metaRawSHA256] // the stream checked that it read the same content
	}
	streamed := time.Since(start) - hashed
	if !hashedFirst {
		meta[metaRawSHA256] = digest
		mr, ok := raw.(objstore.MetadataReplacer)
		if !ok {
			fmt.Fprintf(os.Stderr, "snapfs: %s cannot replace object metadata: %s not set\n", url, metaRawSHA256)
		} else {
			info, err := st.Stat(c.Context, key)
			if err == nil {
				err = mr.ReplaceMetadata(c.Context, key, info.ETag, meta)
			}
			if err != nil {
				return fmt.Errorf("%s is written, but setting its %s metadata failed: %w", url, metaRawSHA256, err)
			}
		}
	}

	el := time.Since(start)
	data := stats.AllocatedClusters * stats.ClusterSize
	ratio := 0.0
	if stats.ImageSize > 0 {
		ratio = float64(vsize) / float64(stats.ImageSize)
	}
	w := c.App.Writer
	fmt.Fprintf(w, "exported %s to %s\n", src.name, url)
	fmt.Fprintf(w, "virtual size: %s (%d bytes)\n", humanSize(vsize), vsize)
	fmt.Fprintf(w, "allocated:    %s (%d clusters of %s, %d compressed)\n", humanSize(data), stats.AllocatedClusters, humanSize(stats.ClusterSize), stats.CompressedClusters)
	fmt.Fprintf(w, "stored:       %s (%d bytes), ratio %.2f\n", humanSize(stats.ImageSize), stats.ImageSize, ratio)
	fmt.Fprintf(w, "raw sha256:   %s\n", digest)
	fmt.Fprintf(w, "time:         %.1fs (%.0f MB/s of source; hashing the source %.1fs, streaming %.1fs, setting the digest metadata %.1fs)\n",
		el.Seconds(), float64(vsize)/el.Seconds()/1e6, hashed.Seconds(), streamed.Seconds(), (el - streamed - hashed).Seconds())
	return nil
}
