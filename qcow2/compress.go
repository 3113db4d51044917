package qcow2

// Decompression of compressed clusters: raw deflate (compression type
// zlib) or a zstd stream, exactly one cluster of output.

import (
	"bytes"
	"fmt"
	"io"
	"sync"

	"github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// zstdMaxWindow bounds the window (and so the memory) a zstd frame may ask
// for; QEMU compresses one cluster (at most 2 MiB) per frame.
const zstdMaxWindow = 8 << 20

var (
	flatePool sync.Pool // of io.ReadCloser implementing flate.Resetter
	zstdPool  sync.Pool // of *zstd.Decoder
)

// decompressCluster decodes the compressed cluster in src (the whole
// compressed range: trailing bytes after the stream are ignored) into dst,
// which is exactly one cluster long. A stream that ends before filling dst
// or is malformed is an error.
func decompressCluster(ctype int, src, dst []byte) error {
	switch ctype {
	case compressionZlib:
		return inflateCluster(src, dst)
	case compressionZstd:
		return unzstdCluster(src, dst)
	}
	return fmt.Errorf("unknown compression type %d", ctype)
}

func inflateCluster(src, dst []byte) error {
	br := bytes.NewReader(src)
	var r io.ReadCloser
	if v := flatePool.Get(); v != nil {
		r = v.(io.ReadCloser)
		if err := r.(flate.Resetter).Reset(br, nil); err != nil {
			return err
		}
	} else {
		r = flate.NewReader(br)
	}
	_, err := io.ReadFull(r, dst)
	flatePool.Put(r)
	if err != nil {
		return fmt.Errorf("deflate stream: %w", err)
	}
	return nil
}

func unzstdCluster(src, dst []byte) error {
	var d *zstd.Decoder
	if v := zstdPool.Get(); v != nil {
		d = v.(*zstd.Decoder)
	} else {
		var err error
		d, err = zstd.NewReader(nil,
			zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxWindow(zstdMaxWindow),
			zstd.WithDecoderMaxMemory(zstdMaxWindow),
			zstd.WithDecodeBuffersBelow(0))
		if err != nil {
			return err
		}
	}
	// A bytes.Reader (not a bytes.Buffer) keeps the decoder streaming, so
	// bytes after the frame are never parsed.
	if err := d.Reset(bytes.NewReader(src)); err != nil {
		d.Close()
		return fmt.Errorf("zstd stream: %w", err)
	}
	_, err := io.ReadFull(d, dst)
	d.Reset(nil)
	zstdPool.Put(d)
	if err != nil {
		return fmt.Errorf("zstd stream: %w", err)
	}
	return nil
}
