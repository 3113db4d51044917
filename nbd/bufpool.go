package nbd

import (
	"math/bits"
	"sync"
)

// Payload buffers come from size-classed pools (powers of two from 4 KiB to
// 64 MiB) so that a busy connection does not allocate a fresh buffer per
// request. Larger requests (only possible with a MaxRequest over 64 MiB) are
// allocated and dropped.
const (
	minBufShift = 12
	maxBufShift = 26
)

var bufPools [maxBufShift - minBufShift + 1]sync.Pool

func bufClass(n int) int {
	if n <= 1<<minBufShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minBufShift
}

// getBuf returns a buffer of length n; give it back with putBuf.
func getBuf(n int) *[]byte {
	c := bufClass(n)
	if c >= len(bufPools) {
		b := make([]byte, n)
		return &b
	}
	if p, _ := bufPools[c].Get().(*[]byte); p != nil {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minBufShift))
	return &b
}

func putBuf(p *[]byte) {
	if p == nil {
		return
	}
	c := bufClass(cap(*p))
	if c >= len(bufPools) || cap(*p) != 1<<(c+minBufShift) {
		return
	}
	*p = (*p)[:0]
	bufPools[c].Put(p)
}
