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
