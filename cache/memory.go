// Package cache holds the cache tiers of snapfs's virtual disks.
package cache

import (
	"errors"
	"sync"
	"sync/atomic"

	"github.com/dgraph-io/ristretto/v2"
)

// Memory is a bounded in-memory cache of decoded blocks, keyed by uint64,
// on ristretto. The cost of an entry is its length in bytes, and the sum
// of the costs stays within the byte budget given to NewMemory.
//
// ristretto admits entries by an estimate of their access frequency and
// applies Sets asynchronously: a Set may be dropped or rejected, and a
// Get right after a Set may miss (until Wait). Callers must not depend on
// a hit for correctness.
//
// Values are shared with every reader that gets them: nobody may modify a
// slice after passing it to Set or receiving it from Get.
//
// All methods are safe for concurrent use, Close included; after Close,
// Get and Has miss and Set does nothing.
type Memory struct {
	// mu is held shared by every operation and exclusively by Close:
	// ristretto panics when used while it closes.
	mu     sync.RWMutex
	closed bool
	c      *ristretto.Cache[uint64, []byte]
	max    int64

	hits, misses atomic.Int64
}

// MemoryStats is a snapshot of a Memory's counters.
type MemoryStats struct {
	Hits, Misses int64 // Get calls that found / did not find the key
	Used         int64 // bytes held now
	Capacity     int64 // the byte budget
	Added        int64 // entries admitted since NewMemory
	Evicted      int64 // entries evicted to make room
	Rejected     int64 // Sets refused by the admission policy
	Dropped      int64 // Sets dropped because the Set buffer was full
}

// typicalEntry is the entry size used to size ristretto's frequency
// counters (the disk's block size is 64 KiB or more; some entries are smaller).
const typicalEntry = 16 << 10

// NewMemory returns a Memory holding at most maxBytes bytes of values.
func NewMemory(maxBytes int64) (*Memory, error) {
	if maxBytes <= 0 {
		return nil, errors.New("cache: memory budget must be positive")
	}
	// ristretto recommends 10 counters per entry the cache can hold.
	items := max(maxBytes/typicalEntry, 64)
	c, err := ristretto.NewCache(&ristretto.Config[uint64, []byte]{
		NumCounters:        10 * items,
		MaxCost:            maxBytes,
		BufferItems:        64,
		Metrics:            true,
		IgnoreInternalCost: true,
	})
	if err != nil {
		return nil, err
	}
	return &Memory{c: c, max: maxBytes}, nil
}

// Get returns the value stored under key, counting a hit or a miss.
func (m *Memory) Get(key uint64) ([]byte, bool) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		m.misses.Add(1)
		return nil, false
	}
	v, ok := m.c.Get(key)
	if ok {
		m.hits.Add(1)
	} else {
		m.misses.Add(1)
	}
	return v, ok
}

// Has reports whether key is present, without counting a hit or a miss.
func (m *Memory) Has(key uint64) bool {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return false
	}
	_, ok := m.c.Get(key)
	return ok
}

// Set offers v under key, at cost len(v). It reports false when the Set
// was dropped at once; true does not promise that v will be admitted.
func (m *Memory) Set(key uint64, v []byte) bool {
	if len(v) == 0 {
		return false
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return false
	}
	return m.c.Set(key, v, int64(len(v)))
}

// Del removes key.
func (m *Memory) Del(key uint64) {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.closed {
		m.c.Del(key)
	}
}

// Wait blocks until the Sets made before it have been applied (admitted
// or rejected), so that a later Get sees the admitted ones.
func (m *Memory) Wait() {
	m.mu.RLock()
	defer m.mu.RUnlock()
	if !m.closed {
		m.c.Wait()
	}
}

// Capacity returns the byte budget.
func (m *Memory) Capacity() int64 { return m.max }

// Stats returns the current counters.
func (m *Memory) Stats() MemoryStats {
	s := MemoryStats{Hits: m.hits.Load(), Misses: m.misses.Load(), Capacity: m.max}
	m.mu.RLock()
	defer m.mu.RUnlock()
	if m.closed {
		return s
	}
	s.Used = m.max - m.c.RemainingCost()
	if mt := m.c.Metrics; mt != nil {
		s.Added = int64(mt.KeysAdded())
		s.Evicted = int64(mt.KeysEvicted())
		s.Rejected = int64(mt.SetsRejected())
		s.Dropped = int64(mt.SetsDropped())
	}
	return s
}

// Close releases the cache. It waits for the operations under way.
func (m *Memory) Close() {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.closed {
		return
	}
	m.closed = true
	m.c.Close()
}
