package objstore

import (
	"context"
	"io"
	"sync"
)

// WithPinning returns a Store that pins each key to the ETag its first
// Stat returned: every later ReadAt of the key carries that ETag as
// IfMatch (unless the caller set one), so reads fail with ErrChanged
// instead of mixing two versions of an object. A later Stat that sees a
// different ETag fails with ErrChanged too. Writing or deleting a key
// through this Store forgets its pin. Safe for concurrent use.
func WithPinning(s Store) Store {
	return &pinStore{Store: s, etags: map[string]string{}}
}

type pinStore struct {
	Store
	mu    sync.Mutex
	etags map[string]string
}

func (p *pinStore) pinned(key string) (string, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	e, ok := p.etags[key]
	return e, ok
}

func (p *pinStore) forget(key string) {
	p.mu.Lock()
	delete(p.etags, key)
	p.mu.Unlock()
}

// Stat pins key on first use and reports ErrChanged if it moved since.
func (p *pinStore) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	info, err := p.Store.Stat(ctx, key)
	if err != nil || info.ETag == "" {
		return info, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if e, ok := p.etags[key]; ok && e != info.ETag {
		return info, &Error{Op: "stat", URL: p.Store.URL(key), Err: ErrChanged}
	}
	p.etags[key] = info.ETag
	return info, nil
}

// ReadAt reads with IfMatch set to key's pinned ETag.
func (p *pinStore) ReadAt(ctx context.Context, key string, b []byte, off int64, opts ReadOptions) (int, error) {
	if opts.IfMatch == "" {
		if e, ok := p.pinned(key); ok {
			opts.IfMatch = e
		}
	}
	return p.Store.ReadAt(ctx, key, b, off, opts)
}

// Put writes key and forgets its pin.
func (p *pinStore) Put(ctx context.Context, key string, r io.Reader, size int64, meta map[string]string) error {
	defer p.forget(key)
	return p.Store.Put(ctx, key, r, size, meta)
}

// Delete removes key and forgets its pin.
func (p *pinStore) Delete(ctx context.Context, key string) error {
	defer p.forget(key)
	return p.Store.Delete(ctx, key)
}

// CompleteMultipart completes the upload and forgets key's pin.
func (p *pinStore) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error {
	defer p.forget(key)
	return p.Store.CompleteMultipart(ctx, key, uploadID, parts)
}
