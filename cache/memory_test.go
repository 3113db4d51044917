package cache

import (
	"bytes"
	"sync"
	"testing"
)

func TestMemoryGetSet(t *testing.T) {
	m, err := NewMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	v := bytes.Repeat([]byte{7}, 4096)
	m.Set(1, v)
	m.Wait()
	got, ok := m.Get(1)
	if !ok || !bytes.Equal(got, v) {
		t.Fatalf("Get(1) = %d bytes, %v; want the value set", len(got), ok)
	}
	if _, ok := m.Get(2); ok {
		t.Fatal("Get(2) hit a key never set")
	}
	if !m.Has(1) || m.Has(2) {
		t.Fatal("Has disagrees with Get")
	}
	s := m.Stats()
	if s.Hits != 1 || s.Misses != 1 {
		t.Fatalf("hits %d misses %d, want 1 and 1 (Has must not count)", s.Hits, s.Misses)
	}
	if s.Used != 4096 || s.Capacity != 1<<20 {
		t.Fatalf("Used %d Capacity %d, want 4096 and %d", s.Used, s.Capacity, 1<<20)
	}
	m.Del(1)
	m.Wait()
	if m.Has(1) {
		t.Fatal("key still present after Del")
	}
	if m.Set(3, nil) {
		t.Fatal("an empty value was accepted")
	}
}

func TestMemoryRefusesNoBudget(t *testing.T) {
	if _, err := NewMemory(0); err == nil {
		t.Fatal("NewMemory(0) succeeded")
	}
}

// The sum of the entries' lengths never exceeds the budget, however many
// are offered.
func TestMemoryBounded(t *testing.T) {
	const budget = 1 << 20
	m, err := NewMemory(budget)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	for i := range uint64(1000) {
		m.Set(i, make([]byte, 64<<10))
		if i%50 == 0 {
			m.Wait()
			if u := m.Stats().Used; u > budget {
				t.Fatalf("after %d Sets: %d bytes used, budget %d", i+1, u, budget)
			}
		}
	}
	m.Wait()
	s := m.Stats()
	if s.Used > budget {
		t.Fatalf("%d bytes used, budget %d", s.Used, budget)
	}
	if s.Evicted+s.Rejected+s.Dropped == 0 {
		t.Fatalf("1000 64 KiB entries fit in 1 MiB: %+v", s)
	}
	held := 0
	for i := range uint64(1000) {
		if v, ok := m.Get(i); ok {
			held++
			if len(v) != 64<<10 {
				t.Fatalf("key %d holds %d bytes", i, len(v))
			}
		}
	}
	if held > budget/(64<<10) {
		t.Fatalf("%d entries of 64 KiB held in a 1 MiB budget", held)
	}
}

// Close may run while other goroutines use the cache (run with -race).
func TestMemoryCloseConcurrent(t *testing.T) {
	m, err := NewMemory(4 << 20)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	stop := make(chan struct{})
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := make([]byte, 1024)
			for i := uint64(0); ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := uint64(g)<<32 | i%512
				m.Set(k, v)
				m.Get(k)
				m.Has(k + 1)
				if i%64 == 0 {
					m.Wait()
					m.Stats()
				}
			}
		}()
	}
	m.Wait()
	m.Close()
	m.Close()
	if _, ok := m.Get(1); ok {
		t.Fatal("Get hit after Close")
	}
	if m.Set(1, []byte{1}) {
		t.Fatal("Set accepted after Close")
	}
	m.Wait()
	close(stop)
	wg.Wait()
}
