// Package bufpool pools byte buffers by size class, so that the data path
// (fetches, NBD payloads, compressed reads) does not allocate, fault in
// and collect a fresh buffer per request.
package bufpool

import (
	"math/bits"
	"sync"
)

// Buffers are pooled in classes of powers of two from 4 KiB to 64 MiB;
// larger ones are allocated and dropped.
const (
	minShift = 12
	maxShift = 26
)

var pools [maxShift - minShift + 1]sync.Pool

func class(n int) int {
	if n <= 1<<minShift {
		return 0
	}
	return bits.Len(uint(n-1)) - minShift
}

// Get returns a buffer of length n with stale contents; give it back with
// Put when no one uses it any more.
func Get(n int) *[]byte {
	c := class(n)
	if c >= len(pools) {
		b := make([]byte, n)
		return &b
	}
	if p, _ := pools[c].Get().(*[]byte); p != nil {
		*p = (*p)[:n]
		return p
	}
	b := make([]byte, n, 1<<(c+minShift))
	return &b
}

// Put returns a buffer from Get to its pool (others are dropped).
func Put(p *[]byte) {
	if p == nil {
		return
	}
	c := class(cap(*p))
	if c >= len(pools) || cap(*p) != 1<<(c+minShift) {
		return
	}
	*p = (*p)[:0]
	pools[c].Put(p)
}
