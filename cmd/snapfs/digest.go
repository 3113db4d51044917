package main

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/internal/zeros"
	"github.com/snapfs/snapfs/qcow2"
)

func digestCommand() *cli.Command {
	return &cli.Command{
		Name:      "digest",
		Usage:     "print the sha256 of a disk's raw content, the same whatever the container",
		ArgsUsage: "SOURCE_OR_URL",
		Description: "A URL with a scheme (s3://, https://, file://) is a QCOW2 image: only its allocated " +
			"clusters are read, holes are hashed as zeros without a fetch, and the result is checked " +
			"against the object's snapfs-raw-sha256 metadata when it has one (exit 1 on a mismatch). " +
			"A plain path is a raw file or block device (holes found with SEEK_DATA are not read), " +
			"- is stdin (with --size). The raw content is the virtual size: the source size rounded " +
			"up to 512 bytes, the extra bytes zeros, as export writes it.",
		Flags: withGlobal(
			&cli.IntFlag{Name: "jobs", Aliases: []string{"j"}, Value: 8, Usage: "reads in flight (images)"},
			&cli.StringFlag{Name: "size", Usage: "size of stdin in bytes"},
		),
		Action: runDigest,
	}
}

func runDigest(c *cli.Context) error {
	arg, err := oneURL(c)
	if err != nil {
		return err
	}
	w := c.App.Writer
	if !strings.Contains(arg, "://") {
		size := int64(-1)
		if c.IsSet("size") {
			if size, err = parseBytes("size", c.String("size")); err != nil {
				return cli.Exit(err.Error(), 2)
			}
		}
		src, err := openRawSource(arg, size)
		if err != nil {
			return err
		}
		defer src.Close()
		sum, err := digestRaw(c.Context, src, nil)
		if err != nil {
			return fmt.Errorf("%s: %w", src.name, err)
		}
		fmt.Fprintf(w, "%s  %s\n", sum, arg)
		return nil
	}

	st, key, err := openStore(c, arg)
	if err != nil {
		return err
	}
	info, err := st.Stat(c.Context, key)
	if err != nil {
		return err
	}
	im, err := qcow2.Open(c.Context, st, key, nil)
	if err != nil {
		return err
	}
	defer im.Close()
	h := sha256.New()
	if err := catToStream(c.Context, im, h, 8<<20, max(c.Int("jobs"), 1), func(int64) {}); err != nil {
		return err
	}
	sum := hex.EncodeToString(h.Sum(nil))
	fmt.Fprintf(w, "%s  %s\n", sum, im.URL())
	if want, ok := info.Metadata[metaRawSHA256]; ok {
		if !strings.EqualFold(want, sum) {
			return cli.Exit(fmt.Sprintf("%s: raw content sha256 %s does not match its %s metadata %s: the object is corrupt or was changed",
				im.URL(), sum, metaRawSHA256, want), 1)
		}
		fmt.Fprintf(os.Stderr, "snapfs: %s: matches its %s metadata\n", im.URL(), metaRawSHA256)
	}
	return nil
}

// digestRaw hashes a raw source in order, hashing zeros for its holes
// without reading them, and zeros up to the next multiple of 512. With
// sums it also records the content's checksums there, for export's check
// that the stream reads what was hashed. A goroutine reads (and
// checksums) the next buffers while this one hashes, so SHA-256 runs
// without waiting for the reads.
func digestRaw(ctx context.Context, src *rawSource, sums *qcow2.SourceSums) (string, error) {
	const buffers, bufSize = 3, 2 << 20
	free := make(chan []byte, buffers)
	for range buffers {
		free <- make([]byte, bufSize)
	}
	pieces := make(chan rawPiece, buffers)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var readErr error
	go func() {
		defer close(pieces)
		readErr = readRaw(ctx, src, sums, free, pieces)
	}()
	h := sha256.New()
	for p := range pieces {
		// A hole of terabytes takes minutes to hash: an interrupt must not
		// wait for it.
		for p.data == nil && p.zeros > 0 {
			if err := ctx.Err(); err != nil {
				return "", err
			}
			k := min(p.zeros, 256<<20)
			zeros.Write(h, k)
			p.zeros -= k
		}
		if p.data == nil {
			continue
		}
		h.Write(p.data)
		free <- p.data[:cap(p.data)]
	}
	if readErr != nil {
		return "", readErr
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// rawPiece is the next part of a raw content: bytes read, or (data nil) a
// run of zeros.
type rawPiece struct {
	data  []byte
	zeros int64
}

// readRaw sends the raw content of src in order to pieces, reading into
// buffers from free, and records it into sums when not nil.
func readRaw(ctx context.Context, src *rawSource, sums *qcow2.SourceSums, free chan []byte, pieces chan<- rawPiece) error {
	pos := int64(0)
	r := src.reader()
	hs, _ := r.(qcow2.HoleSeeker)
	send := func(p rawPiece) error {
		select {
		case pieces <- p:
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	zeroRun := func(n int64) error {
		if n <= 0 {
			return nil
		}
		if sums != nil {
			sums.WriteZeros(n)
		}
		return send(rawPiece{zeros: n})
	}
	for pos < src.size {
		end := src.size
		if hs != nil {
			start, e, err := hs.NextData(pos)
			if err != nil {
				return err
			}
			start = max(start, pos)
			if start >= src.size || e <= start {
				if err := zeroRun(src.size - pos); err != nil {
					return err
				}
				pos = src.size
				break
			}
			if err := zeroRun(start - pos); err != nil {
				return err
			}
			pos, end = start, min(e, src.size)
			if _, err := hs.Seek(pos, io.SeekStart); err != nil {
				return err
			}
		}
		for pos < end {
			var buf []byte
			select {
			case buf = <-free:
			case <-ctx.Done():
				return ctx.Err()
			}
			n := min(int64(len(buf)), end-pos)
			if _, err := io.ReadFull(r, buf[:n]); err != nil {
				return fmt.Errorf("reading at %d: %w", pos, err)
			}
			if sums != nil {
				sums.Write(buf[:n])
			}
			if err := send(rawPiece{data: buf[:n]}); err != nil {
				return err
			}
			pos += n
		}
	}
	return zeroRun((src.size+511)&^511 - src.size)
}
