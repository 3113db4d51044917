package disk

import (
	"math/bits"
	"sync"
)

// Fetch buffers are pooled by size class: class c holds buffers of
// capacity 1<<c, from 64 KiB to 64 MiB; other sizes are allocated.
const (
	minPoolClass = 16
	maxPoolClass = 26
)

var bufPools [maxPoolClass + 1]sync.Pool

// getBuf returns a buffer of length n, with stale contents.
func getBuf(n int) *[]byte {
	c := max(bits.Len(uint(n-1)), minPoolClass)
	if c > maxPoolClass {
		b := make([]byte, n)
		return &b
	}
	if v := bufPools[c].Get(); v != nil {
		bp := v.(*[]byte)
		*bp = (*bp)[:n]
		return bp
	}
	b := make([]byte, n, 1<<c)
	return &b
}

// putBuf returns a buffer from getBuf to its pool.
func putBuf(bp *[]byte) {
	c := cap(*bp)
	if c&(c-1) != 0 {
		return
	}
	if k := bits.TrailingZeros(uint(c)); k >= minPoolClass && k <= maxPoolClass {
		bufPools[k].Put(bp)
	}
}
