package disk

import "sync/atomic"

// Stats counts what disks do. Fields are updated atomically and may be
// read at any time; one Stats may be shared by several disks.
type Stats struct {
	Hits           atomic.Int64 // blocks answered by the memory cache
	Misses         atomic.Int64 // blocks with data that were not in the cache
	Shared         atomic.Int64 // of the Misses, blocks taken from another reader's fetch
	ZeroBytes      atomic.Int64 // bytes of zero or unallocated blocks served without a fetch
	Fetches        atomic.Int64 // image reads issued (each is one GET or more)
	BytesFetched   atomic.Int64 // guest bytes read by successful fetches
	ReadaheadBytes atomic.Int64 // of BytesFetched, bytes read ahead of sequential readers
	FetchErrors    atomic.Int64 // fetches that failed
	InFlight       atomic.Int64 // fetches under way now
}

// StatsSnapshot is a copy of Stats at one moment.
type StatsSnapshot struct {
	Hits, Misses, Shared, ZeroBytes       int64
	Fetches, BytesFetched, ReadaheadBytes int64
	FetchErrors, InFlight                 int64
	Gets                                  int64 // GETs issued: the store's count when Options.Metrics was given, else Fetches
	StoreBytes                            int64 // bytes the store returned (Options.Metrics), else BytesFetched
}

// Snapshot returns the current counters; Gets and StoreBytes are Fetches
// and BytesFetched.
func (s *Stats) Snapshot() StatsSnapshot {
	v := StatsSnapshot{
		Hits:           s.Hits.Load(),
		Misses:         s.Misses.Load(),
		Shared:         s.Shared.Load(),
		ZeroBytes:      s.ZeroBytes.Load(),
		Fetches:        s.Fetches.Load(),
		BytesFetched:   s.BytesFetched.Load(),
		ReadaheadBytes: s.ReadaheadBytes.Load(),
		FetchErrors:    s.FetchErrors.Load(),
		InFlight:       s.InFlight.Load(),
	}
	v.Gets, v.StoreBytes = v.Fetches, v.BytesFetched
	return v
}

// Stats returns the disk's counters (shared with other disks when
// Options.Stats was), with the GETs and bytes of Options.Metrics when
// given (which include metadata reads).
func (d *Disk) Stats() StatsSnapshot {
	v := d.stats.Snapshot()
	if d.metrics != nil {
		v.Gets, v.StoreBytes = d.metrics.Gets.Load(), d.metrics.BytesRead.Load()
	}
	return v
}
