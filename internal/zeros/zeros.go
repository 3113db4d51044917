// Package zeros answers the two questions about zero bytes that the
// format, cache and CLI layers all ask: is this buffer all zeros, and
// what does a run of zeros add to a hash.
package zeros

import (
	"bytes"
	"io"
)

// block is compared with and written for runs of zeros; nobody modifies
// it.
var block = make([]byte, 64<<10)

// Is reports whether p is all zeros. It compares p with a block of zeros
// (bytes.Equal runs vectorized): several times faster than a loop over
// words.
func Is(p []byte) bool {
	for len(p) > 0 {
		k := min(len(p), len(block))
		if !bytes.Equal(p[:k], block[:k]) {
			return false
		}
		p = p[k:]
	}
	return true
}

// Block returns min(n, 64 KiB) zero bytes (nil for n <= 0), shared: the
// caller must not modify them.
func Block(n int64) []byte {
	return block[:max(min(n, int64(len(block))), 0)]
}

// Write writes n zero bytes to w (a hash, typically), 64 KiB at a time.
func Write(w io.Writer, n int64) error {
	for n > 0 {
		z := Block(n)
		if _, err := w.Write(z); err != nil {
			return err
		}
		n -= int64(len(z))
	}
	return nil
}
