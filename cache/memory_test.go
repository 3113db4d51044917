package cache

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
)

func TestMemoryPutRead(t *testing.T) {
	m, err := NewMemory(1 << 20)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	v := make([]byte, 3*PageSize+100) // spans four pages
	for i := range v {
		v[i] = byte(i * 7)
	}
	m.Put(1, 9, v)
	m.Wait()
	got := make([]byte, len(v))
	if !m.Read(1, 9, got, 0) || !bytes.Equal(got, v) {
		t.Fatal("Read(1) did not return the value put")
	}
	// A part across a page boundary.
	part := make([]byte, 1000)
	if !m.Read(1, 9, part, 2*PageSize-500) || !bytes.Equal(part, v[2*PageSize-500:2*PageSize+500]) {
		t.Fatal("Read of a part across pages is wrong")
	}
	if m.Read(1, 8, part, 0) {
		t.Fatal("Read with another tag hit")
	}
	if m.Read(1, 9, part, len(v)-999) {
		t.Fatal("Read past the value's end hit")
	}
	if m.Read(2, 9, part, 0) {
		t.Fatal("Read(2) hit a key never put")
	}
	if !m.Has(1) || m.Has(2) {
		t.Fatal("Has disagrees with Read")
	}
	s := m.Stats()
	if s.Hits != 2 || s.Misses != 3 {
		t.Fatalf("hits %d misses %d, want 2 and 3 (Has must not count)", s.Hits, s.Misses)
	}
	if s.Used != 4*PageSize || s.Capacity != 1<<20 {
		t.Fatalf("Used %d Capacity %d, want %d and %d", s.Used, s.Capacity, 4*PageSize, 1<<20)
	}
	m.Del(1)
	m.Wait()
	if m.Has(1) || m.Stats().Used != 0 {
		t.Fatalf("key still present or pages held after Del: %+v", m.Stats())
	}
	if m.Put(3, 0, nil) {
		t.Fatal("an empty value was accepted")
	}
	if m.Put(4, 0, make([]byte, 2<<20)) {
		t.Fatal("a value larger than the budget was accepted")
	}
	// Replacing a key gives the old value's pages back.
	m.Put(5, 0, make([]byte, PageSize))
	m.Wait()
	m.Put(5, 0, bytes.Repeat([]byte{5}, PageSize))
	m.Wait()
	if u := m.Stats().Used; u != PageSize {
		t.Fatalf("%d bytes held after replacing a one-page value, want %d", u, PageSize)
	}
}

func TestMemoryRefusesNoBudget(t *testing.T) {
	if _, err := NewMemory(0); err == nil {
		t.Fatal("NewMemory(0) succeeded")
	}
	if _, err := NewMemory(PageSize - 1); err == nil {
		t.Fatal("NewMemory below one page succeeded")
	}
}

// The bytes held never exceed the budget, however many values are offered
// by however many goroutines, and the cache keeps being refreshed (new
// values are still admitted once it is full).
func TestMemoryBounded(t *testing.T) {
	const budget = 1 << 20
	m, err := NewMemory(budget)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	var wg sync.WaitGroup
	var over sync.Once
	var overBy int64
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := make([]byte, 64<<10)
			for i := range uint64(500) {
				m.Put(uint64(g)<<32|i, 0, v)
				if u := m.Stats().Used; u > budget {
					over.Do(func() { overBy = u })
				}
				if i%50 == 0 {
					m.Wait()
				}
			}
		}()
	}
	wg.Wait()
	m.Wait()
	if overBy > 0 {
		t.Fatalf("%d bytes held, budget %d", overBy, budget)
	}
	s := m.Stats()
	if s.Evicted+s.Rejected+s.Dropped == 0 {
		t.Fatalf("2000 64 KiB entries fit in 1 MiB: %+v", s)
	}
	held := 0
	buf := make([]byte, 64<<10)
	for g := range uint64(4) {
		for i := range uint64(500) {
			if m.Read(g<<32|i, 0, buf, 0) {
				held++
			}
		}
	}
	if held > budget/(64<<10) {
		t.Fatalf("%d entries of 64 KiB held in a 1 MiB budget", held)
	}
	// Full of entries read often, the cache still takes a value offered
	// repeatedly.
	for range 50 {
		m.Put(1<<40, 0, buf)
		m.Wait()
		m.Read(1<<40, 0, buf, 0)
	}
	if !m.Read(1<<40, 0, buf, 0) {
		t.Fatalf("a value offered 50 times was never admitted: %+v", m.Stats())
	}
}

// Readers racing with Puts that evict and reuse pages always get a whole,
// correct value or a miss, never bytes of another value (run with -race).
func TestMemoryReadersNeverSeeReusedPages(t *testing.T) {
	m, err := NewMemory(64 * PageSize)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	fill := func(v []byte, key uint64) {
		for i := 0; i < len(v); i += 8 {
			binary.LittleEndian.PutUint64(v[i:], key)
		}
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for g := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v := make([]byte, 8*PageSize)
			for i := uint64(0); ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				k := uint64(g)<<32 | i%16
				fill(v, k)
				m.Put(k, k, v)
			}
		}()
	}
	var bad atomic.Value // error
	for r := range 2 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p := make([]byte, 8*PageSize)
			for i := uint64(0); ; i++ {
				if i%64 == 0 {
					select {
					case <-stop:
						return
					default:
					}
				}
				k := (i+uint64(r))%3<<32 | i%16
				if !m.Read(k, k, p, 0) {
					continue
				}
				for j := 0; j < len(p); j += 8 {
					if got := binary.LittleEndian.Uint64(p[j:]); got != k {
						bad.Store(errorf("key %#x: byte %d holds %#x", k, j, got))
						return
					}
				}
			}
		}()
	}
	// Run until enough hits raced with evictions (or far too many reads).
	for {
		s := m.Stats()
		if s.Hits >= 2000 && s.Evicted >= 500 || s.Hits+s.Misses > 5_000_000 || bad.Load() != nil {
			break
		}
		runtime.Gosched()
	}
	close(stop)
	wg.Wait()
	if err := bad.Load(); err != nil {
		t.Fatal(err)
	}
	if s := m.Stats(); s.Hits < 500 || s.Evicted < 200 {
		t.Fatalf("too few hits or evictions to race: %+v", s)
	}
}

// Churning many times the budget through the cache does not grow the Go
// heap: the values live in the arena.
func TestMemoryChurnOffHeap(t *testing.T) {
	const budget = 16 << 20
	m, err := NewMemory(budget)
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	v := make([]byte, 64<<10)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	const total = 10 * budget
	for i := range uint64(total / len(v)) {
		m.Put(i, 0, v)
		if i%32 == 0 {
			m.Wait()
		}
	}
	m.Wait()
	runtime.ReadMemStats(&after)
	if alloc := after.TotalAlloc - before.TotalAlloc; alloc > total/8 {
		t.Fatalf("putting %d MiB allocated %d MiB on the Go heap", total>>20, alloc>>20)
	}
	if s := m.Stats(); s.Added < budget/(64<<10) {
		t.Fatalf("too few values admitted: %+v", s)
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
				m.Put(k, 0, v)
				m.Read(k, 0, v[:10], 0)
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
	if m.Read(1, 0, make([]byte, 1), 0) {
		t.Fatal("Read hit after Close")
	}
	if m.Put(1, 0, []byte{1}) {
		t.Fatal("Put accepted after Close")
	}
	m.Wait()
	close(stop)
	wg.Wait()
}

func errorf(format string, args ...any) error { return fmt.Errorf(format, args...) }
