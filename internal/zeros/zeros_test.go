package zeros

import (
	"bytes"
	"crypto/sha256"
	"testing"
)

func TestIs(t *testing.T) {
	for n := 0; n < 40; n++ {
		p := make([]byte, n)
		if !Is(p) {
			t.Fatalf("Is(%d zeros) = false", n)
		}
		for i := range n {
			p[i] = 1
			if Is(p) {
				t.Fatalf("Is(%d bytes, byte %d set) = true", n, i)
			}
			p[i] = 0
		}
	}
}

func TestWrite(t *testing.T) {
	for _, n := range []int64{0, 1, 64<<10 - 1, 64 << 10, 200<<10 + 3} {
		h := sha256.New()
		if err := Write(h, n); err != nil {
			t.Fatal(err)
		}
		want := sha256.Sum256(make([]byte, n))
		if !bytes.Equal(h.Sum(nil), want[:]) {
			t.Errorf("Write(%d): wrong hash", n)
		}
	}
}

// TestIsLong covers buffers longer than the block Is compares with: a set
// byte in any block, and at either end, is found.
func TestIsLong(t *testing.T) {
	for _, n := range []int{64 << 10, 64<<10 + 1, 200<<10 + 7, 1 << 20} {
		p := make([]byte, n)
		if !Is(p) {
			t.Fatalf("Is(%d zeros) = false", n)
		}
		for _, i := range []int{0, n / 2, 64<<10 - 1, n - 64<<10, n - 1} {
			p[i] = 0x80
			if Is(p) {
				t.Fatalf("Is(%d bytes, byte %d set) = true", n, i)
			}
			p[i] = 0
		}
	}
}

func TestBlock(t *testing.T) {
	for _, c := range []struct{ n, want int64 }{{-1, 0}, {0, 0}, {5, 5}, {64 << 10, 64 << 10}, {1 << 30, 64 << 10}} {
		b := Block(c.n)
		if int64(len(b)) != c.want || !Is(b) {
			t.Errorf("Block(%d): %d bytes, zeros %v; want %d zeros", c.n, len(b), Is(b), c.want)
		}
	}
}
