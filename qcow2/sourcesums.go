package qcow2

import (
	"hash/crc32"

	"github.com/snapfs/snapfs/internal/zeros"
)

// SourceSumChunk is the span of raw content each SourceSums checksum covers.
const SourceSumChunk = 1 << 20

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// zeroChunkSum is the CRC-32C of a SourceSumChunk of zeros.
var zeroChunkSum = func() uint32 {
	var s SourceSums
	s.crcZeros(SourceSumChunk)
	return s.cur
}()

// SourceSums records a CRC-32C of every SourceSumChunk bytes of a raw
// content written to it in order (4 bytes per MiB). A first read of a
// source records them while it hashes the content; WriteStream, given them
// as StreamOptions.ExpectSums, checks that its own read yields the same
// content, at about a fiftieth of the CPU of hashing it again with SHA-256.
// It detects a source that changed between the reads, not a forgery.
type SourceSums struct {
	sums []uint32
	cur  uint32 // CRC of the chunk being filled
	n    int64  // bytes in it
}

// Write adds p to the content; it never fails.
func (s *SourceSums) Write(p []byte) (int, error) {
	written := len(p)
	for len(p) > 0 {
		k := min(int64(len(p)), SourceSumChunk-s.n)
		s.cur = crc32.Update(s.cur, castagnoli, p[:k])
		s.n += k
		p = p[k:]
		s.endChunk()
	}
	return written, nil
}

// WriteZeros adds n zero bytes to the content: whole chunks of zeros cost
// nothing.
func (s *SourceSums) WriteZeros(n int64) {
	for n > 0 {
		if s.n == 0 && n >= SourceSumChunk {
			s.sums = append(s.sums, zeroChunkSum)
			n -= SourceSumChunk
			continue
		}
		k := min(n, SourceSumChunk-s.n)
		s.crcZeros(k)
		n -= k
		s.endChunk()
	}
}

// crcZeros adds k zeros to the current chunk's CRC.
func (s *SourceSums) crcZeros(k int64) {
	for k > 0 {
		z := zeros.Block(k)
		s.cur = crc32.Update(s.cur, castagnoli, z)
		s.n += int64(len(z))
		k -= int64(len(z))
	}
}

func (s *SourceSums) endChunk() {
	if s.n == SourceSumChunk {
		s.sums = append(s.sums, s.cur)
		s.cur, s.n = 0, 0
	}
}

// Len returns the number of content bytes written.
func (s *SourceSums) Len() int64 {
	return int64(len(s.sums))*SourceSumChunk + s.n
}

// Equal reports whether s and o recorded the same content (same length,
// same checksums), and otherwise the offset of the first chunk that
// differs.
func (s *SourceSums) Equal(o *SourceSums) (bool, int64) {
	for i := range min(len(s.sums), len(o.sums)) {
		if s.sums[i] != o.sums[i] {
			return false, int64(i) * SourceSumChunk
		}
	}
	if len(s.sums) != len(o.sums) || s.n != o.n || s.cur != o.cur {
		return false, int64(min(len(s.sums), len(o.sums))) * SourceSumChunk
	}
	return true, 0
}
