// Package zeros answers the two questions about zero bytes that the
// format, cache and CLI layers all ask: is this buffer all zeros, and
// what does a run of zeros add to a hash.
package zeros

import (
	"encoding/binary"
	"io"
)

// Is reports whether p is all zeros.
func Is(p []byte) bool {
	for len(p) >= 8 {
		if binary.NativeEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// block is written for runs of zeros; nobody modifies it.
var block = make([]byte, 64<<10)

// Write writes n zero bytes to w (a hash, typically), 64 KiB at a time.
func Write(w io.Writer, n int64) error {
	for n > 0 {
		k := min(n, int64(len(block)))
		if _, err := w.Write(block[:k]); err != nil {
			return err
		}
		n -= k
	}
	return nil
}
