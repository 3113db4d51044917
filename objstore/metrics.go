package objstore

import (
	"context"
	"io"
	"sync/atomic"
)

// Metrics counts the traffic of a Store wrapped by WithMetrics. Fields are
// updated atomically and may be read at any time.
type Metrics struct {
	Gets         atomic.Int64 // ReadAt calls (ranged GETs)
	BytesRead    atomic.Int64 // bytes returned by ReadAt
	Stats        atomic.Int64 // Stat calls
	Lists        atomic.Int64 // List calls
	Puts         atomic.Int64 // Put and UploadPart calls
	BytesWritten atomic.Int64 // bytes stored by successful Put and UploadPart calls
	Errors       atomic.Int64 // calls that failed (io.EOF at the end of an object is no failure)
	InFlight     atomic.Int64 // ReadAt calls under way now
}

// MetricsSnapshot is a copy of Metrics at one moment.
type MetricsSnapshot struct {
	Gets, BytesRead, Stats, Lists, Puts, BytesWritten, Errors, InFlight int64
}

// Snapshot returns the current counter values.
func (m *Metrics) Snapshot() MetricsSnapshot {
	return MetricsSnapshot{
		Gets:         m.Gets.Load(),
		BytesRead:    m.BytesRead.Load(),
		Stats:        m.Stats.Load(),
		Lists:        m.Lists.Load(),
		Puts:         m.Puts.Load(),
		BytesWritten: m.BytesWritten.Load(),
		Errors:       m.Errors.Load(),
		InFlight:     m.InFlight.Load(),
	}
}

// WithMetrics returns a Store that counts s's traffic into m (which must
// not be nil).
func WithMetrics(s Store, m *Metrics) Store {
	return &metricsStore{Store: s, m: m}
}

type metricsStore struct {
	Store
	m *Metrics
}

func (s *metricsStore) count(err error) {
	if err != nil && err != io.EOF {
		s.m.Errors.Add(1)
	}
}

// Stat counts one Stat.
func (s *metricsStore) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	s.m.Stats.Add(1)
	info, err := s.Store.Stat(ctx, key)
	s.count(err)
	return info, err
}

// ReadAt counts one GET, its bytes, and the reads in flight.
func (s *metricsStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts ReadOptions) (int, error) {
	s.m.Gets.Add(1)
	s.m.InFlight.Add(1)
	n, err := s.Store.ReadAt(ctx, key, p, off, opts)
	s.m.InFlight.Add(-1)
	s.m.BytesRead.Add(int64(n))
	s.count(err)
	return n, err
}

// List counts one List.
func (s *metricsStore) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	s.m.Lists.Add(1)
	out, err := s.Store.List(ctx, prefix)
	s.count(err)
	return out, err
}

// Put counts one Put and, on success, its bytes.
func (s *metricsStore) Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	s.m.Puts.Add(1)
	if size >= 0 {
		err := s.Store.Put(ctx, key, r, size, meta)
		s.count(err)
		if err == nil {
			s.m.BytesWritten.Add(size)
		}
		return err
	}
	cr := &countingReader{r: r}
	err := s.Store.Put(ctx, key, cr, size, meta)
	s.count(err)
	if err == nil {
		s.m.BytesWritten.Add(cr.n)
	}
	return err
}

// UploadPart counts one part upload and, on success, its bytes.
func (s *metricsStore) UploadPart(ctx context.Context, key, uploadID string, number int, r io.Reader, size int64) (Part, error) {
	s.m.Puts.Add(1)
	part, err := s.Store.UploadPart(ctx, key, uploadID, number, r, size)
	s.count(err)
	if err == nil {
		s.m.BytesWritten.Add(part.Size)
	}
	return part, err
}

// Delete counts failures only.
func (s *metricsStore) Delete(ctx context.Context, key string) error {
	err := s.Store.Delete(ctx, key)
	s.count(err)
	return err
}

// CreateMultipart counts failures only.
func (s *metricsStore) CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error) {
	id, err := s.Store.CreateMultipart(ctx, key, meta)
	s.count(err)
	return id, err
}

// CompleteMultipart counts failures only.
func (s *metricsStore) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error {
	err := s.Store.CompleteMultipart(ctx, key, uploadID, parts)
	s.count(err)
	return err
}

// AbortMultipart counts failures only.
func (s *metricsStore) AbortMultipart(ctx context.Context, key, uploadID string) error {
	err := s.Store.AbortMultipart(ctx, key, uploadID)
	s.count(err)
	return err
}

type countingReader struct {
	r io.Reader
	n int64
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	c.n += int64(n)
	return n, err
}
