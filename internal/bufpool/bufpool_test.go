package bufpool

import "testing"

// Get returns the length asked for, in a class-sized buffer that Put takes
// back and a later Get of the same class reuses; odd and huge sizes work.
func TestGetPut(t *testing.T) {
	for _, n := range []int{0, 1, 4096, 4097, 65536, 1<<20 + 3, 64 << 20, 64<<20 + 1} {
		p := Get(n)
		if len(*p) != n {
			t.Fatalf("Get(%d): length %d", n, len(*p))
		}
		if n <= 64<<20 && cap(*p)&(cap(*p)-1) != 0 {
			t.Fatalf("Get(%d): capacity %d is not a power of two", n, cap(*p))
		}
		Put(p)
	}
	seen := false
	for range 100 { // sync.Pool may drop items; one reuse in 100 tries is enough
		p := Get(100000)
		(*p)[0] = 42
		Put(p)
		if q := Get(120000); &(*q)[:1][0] == &(*p)[:1][0] {
			seen = true
			Put(q)
			break
		}
	}
	if !seen {
		t.Fatal("a buffer given back was never reused by a Get of its class")
	}
	Put(nil)
	b := make([]byte, 5000) // not from Get: dropped, not pooled
	Put(&b)
}
