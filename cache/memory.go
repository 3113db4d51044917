// Package cache holds the cache tiers of snapfs's virtual disks.
package cache

import (
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"github.com/dgraph-io/ristretto/v2"
)

// Memory is a bounded in-memory cache of decoded blocks, keyed by uint64,
// with ristretto as the admission and eviction policy.
//
// The bytes live in one arena of the budget's size, mapped outside the Go
// heap and cut into 16 KiB pages: a value occupies whole pages, Put copies
// it in and Read copies it out, so the memory held is the budget however
// fast entries churn, and the garbage collector neither scans nor counts
// it. Pages come back when ristretto evicts, rejects, replaces or deletes
// an entry; a reader copying an entry holds it, so its pages are never
// reused under the reader.
//
// ristretto admits entries by an estimate of their access frequency and
// applies Puts asynchronously: a Put may be dropped or rejected, and a
// Read right after a Put may miss (until Wait). Callers must not depend
// on a hit for correctness.
//
// All methods are safe for concurrent use, Close included; after Close,
// Read and Has miss and Put does nothing.
type Memory struct {
	// mu is held shared by every operation and exclusively by Close:
	// ristretto panics when used while it closes, and the arena is
	// unmapped by Close.
	mu     sync.RWMutex
	closed bool
	c      *ristretto.Cache[uint64, *entry]
	max    int64
	policy int64 // ristretto's MaxCost: max less the reserve for Puts not yet applied

	arena []byte
	pmu   sync.Mutex
	free  []int32 // free pages, a stack; under pmu
	used  atomic.Int64

	hits, misses, dropped atomic.Int64
}

// PageSize is the allocation unit of a Memory: a value of n bytes costs n
// rounded up to whole pages.
const PageSize = 16 << 10

// entry is one value: its length, its tag, and the arena pages holding it.
// mu is held shared while a reader copies out and exclusively while the
// pages are given back, after which freed is set.
type entry struct {
	mu    sync.RWMutex
	freed bool
	tag   uint64
	n     int
	pages []int32
	small [4]int32 // pages of values up to 64 KiB, without an allocation
}

// MemoryStats is a snapshot of a Memory's counters.
type MemoryStats struct {
	Hits, Misses int64 // Read calls that found / did not find the key
	Used         int64 // bytes of pages held now (admitted or being admitted)
	Capacity     int64 // the byte budget
	Added        int64 // entries admitted since NewMemory
	Evicted      int64 // entries evicted to make room
	Rejected     int64 // Puts refused by the admission policy
	Dropped      int64 // Puts dropped: the Set buffer was full or no page was free
}

// typicalEntry is the entry size used to size ristretto's frequency
// counters (the disk's block size is 64 KiB or more; some entries are smaller).
const typicalEntry = 16 << 10

// NewMemory returns a Memory holding at most maxBytes bytes of values
// (whole pages: at least one page).
func NewMemory(maxBytes int64) (*Memory, error) {
	if maxBytes <= 0 {
		return nil, errors.New("cache: memory budget must be positive")
	}
	npages := maxBytes / PageSize
	if npages < 1 {
		return nil, fmt.Errorf("cache: memory budget of %d bytes is below one %d-byte page", maxBytes, PageSize)
	}
	if npages > 1<<31-1 {
		return nil, fmt.Errorf("cache: memory budget of %d bytes is too large", maxBytes)
	}
	// ristretto applies a Set after Set returns, so pages are taken before
	// the policy knows of them: it is given the budget less a reserve (a
	// 16th) for the Puts under way, so that when a Put finds no free page,
	// applying the pending ones (Wait) frees enough.
	reserve := npages / 16
	if npages >= 2 {
		reserve = max(reserve, 1)
	}
	policy := (npages - reserve) * PageSize
	items := max(maxBytes/typicalEntry, 64)
	m := &Memory{max: npages * PageSize, policy: policy}
	arena, err := mapArena(int(npages * PageSize))
	if err != nil {
		return nil, fmt.Errorf("cache: mapping %d bytes: %w", npages*PageSize, err)
	}
	m.arena = arena
	m.free = make([]int32, npages)
	for i := range m.free {
		m.free[i] = int32(npages) - 1 - int32(i) // low pages first
	}
	c, err := ristretto.NewCache(&ristretto.Config[uint64, *entry]{
		// ristretto recommends 10 counters per entry the cache can hold.
		NumCounters:        10 * items,
		MaxCost:            policy,
		BufferItems:        64,
		Metrics:            true,
		IgnoreInternalCost: true,
		OnExit:             m.release,
	})
	if err != nil {
		unmapArena(arena)
		return nil, err
	}
	m.c = c
	return m, nil
}

// alloc gives e k free pages; false when there are fewer free.
func (m *Memory) alloc(e *entry, k int) bool {
	m.pmu.Lock()
	defer m.pmu.Unlock()
	if len(m.free) < k {
		return false
	}
	if k <= len(e.small) {
		e.pages = e.small[:k]
	} else {
		e.pages = make([]int32, k)
	}
	copy(e.pages, m.free[len(m.free)-k:])
	m.free = m.free[:len(m.free)-k]
	m.used.Add(int64(k) * PageSize)
	return true
}

// release gives e's pages back, once, after the readers copying from it.
// ristretto calls it for every value that leaves the cache.
func (m *Memory) release(e *entry) {
	if e == nil {
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.freed {
		return
	}
	e.freed = true
	m.pmu.Lock()
	m.free = append(m.free, e.pages...)
	m.pmu.Unlock()
	m.used.Add(-int64(len(e.pages)) * PageSize)
	e.pages = nil
}

// page returns the arena bytes of page pg.
func (m *Memory) page(pg int32) []byte {
	o := int(pg) * PageSize
	return m.arena[o : o+PageSize : o+PageSize]
}

// Put offers a copy of v under key, marked with tag (which Read must
// name). It reports false when the value was dropped at once (empty, too
// large, no free page, or ristretto's buffer full); true does not promise
// that v will be admitted.
func (m *Memory) Put(key, tag uint64, v []byte) bool {
	if len(v) == 0 {
		return false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return false
	}
	k := (len(v) + PageSize - 1) / PageSize
	cost := int64(k) * PageSize
	if cost > m.policy {
		m.dropped.Add(1)
		return false
	}
	e := &entry{tag: tag, n: len(v)}
	if !m.alloc(e, k) {
		// Apply the pending Sets: their evictions free pages.
		m.c.Wait()
		if !m.alloc(e, k) {
			m.dropped.Add(1)
			return false
		}
	}
	for i, pg := range e.pages {
		copy(m.page(pg), v[i*PageSize:])
	}
	if !m.c.Set(key, e, cost) {
		m.release(e)
		return false
	}
	return true
}

// Read copies into p the bytes of the value under key from offset off,
// counting a hit or a miss. It misses when the key is absent, carries
// another tag, or its value ends before off+len(p).
func (m *Memory) Read(key, tag uint64, p []byte, off int) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed || !m.read(key, tag, p, off) {
		m.misses.Add(1)
		return false
	}
	m.hits.Add(1)
	return true
}

func (m *Memory) read(key, tag uint64, p []byte, off int) bool {
	e, ok := m.c.Get(key)
	if !ok || e == nil {
		return false
	}
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.freed || e.tag != tag || off < 0 || off+len(p) > e.n {
		return false
	}
	for done := 0; done < len(p); {
		pos := off + done
		done += copy(p[done:], m.page(e.pages[pos/PageSize])[pos%PageSize:])
	}
	return true
}

// Has reports whether key is present, without counting a hit or a miss.
func (m *Memory) Has(key uint64) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return false
	}
	e, ok := m.c.Get(key)
	return ok && e != nil
}

// Del removes key.
func (m *Memory) Del(key uint64) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.closed {
		m.c.Del(key)
	}
}

// Wait blocks until the Puts made before it have been applied (admitted
// or rejected), so that a later Read sees the admitted ones.
func (m *Memory) Wait() {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.closed {
		m.c.Wait()
	}
}

// Capacity returns the byte budget (whole pages).
func (m *Memory) Capacity() int64 { return m.max }

// Room returns how many bytes of values fit without evicting any (the
// admission policy's budget less the pages held).
func (m *Memory) Room() int64 { return max(m.policy-m.used.Load(), 0) }

// Stats returns the current counters.
func (m *Memory) Stats() MemoryStats {
	s := MemoryStats{Hits: m.hits.Load(), Misses: m.misses.Load(), Capacity: m.max, Used: m.used.Load(), Dropped: m.dropped.Load()}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return s
	}
	if mt := m.c.Metrics; mt != nil {
		s.Added = int64(mt.KeysAdded())
		s.Evicted = int64(mt.KeysEvicted())
		s.Rejected = int64(mt.SetsRejected())
		s.Dropped += int64(mt.SetsDropped())
	}
	return s
}

// Close releases the cache and its memory. It waits for the operations
// under way.
func (m *Memory) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.closed = true
	m.c.Close()
	unmapArena(m.arena)
	m.arena = nil
}
