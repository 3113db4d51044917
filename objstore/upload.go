package objstore

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Multipart upload limits of S3.
const (
	MinPartSize  = 5 << 20 // every part but the last
	MaxPartCount = 10000
)

// Upload writes one object through a Store's Multipart API in a stream,
// with part 1 sent last: Write buffers the bytes that follow part 1 into
// parts of PartSize and uploads them (up to Parallel at once) as they
// fill; Finish uploads part 1, the last partial part, and completes the
// upload. Any error, and Abort, abort the upload, so no partial object
// becomes visible and no parts are left behind. An Upload is used by one
// goroutine.
type Upload struct {
	st       Multipart
	url      string
	key      string
	id       string
	partSize int64
	ctx      context.Context
	cancel   context.CancelFunc

	buf    []byte // the part being filled
	next   int    // number of the part being filled
	sem    chan []byte
	wg     sync.WaitGroup
	mu     sync.Mutex
	parts  []Part
	err    error
	closed bool
	sent   int64 // bytes acknowledged by the store
}

// UploadOptions tune NewUpload.
type UploadOptions struct {
	// PartSize is the size of parts 2 and on; at least MinPartSize.
	PartSize int64
	// Parallel is the number of parts uploaded at once; zero means 2.
	Parallel int
	// Meta is the object's user metadata.
	Meta map[string]string
}

// PartSizeFor returns the smallest part size, a multiple of 1 MiB and at
// least min (and MinPartSize), that fits size bytes in MaxPartCount-1
// parts after a first part.
func PartSizeFor(size, min int64) int64 {
	ps := max(min, MinPartSize)
	if need := (size + MaxPartCount - 2) / (MaxPartCount - 1); need > ps {
		ps = need
	}
	return (ps + 1<<20 - 1) &^ (1<<20 - 1)
}

// NewUpload starts a multipart upload of key in st; urlOf names the object
// in errors (Store.URL).
func NewUpload(ctx context.Context, st Store, key string, opts UploadOptions) (*Upload, error) {
	if opts.PartSize < MinPartSize {
		opts.PartSize = MinPartSize
	}
	if opts.Parallel <= 0 {
		opts.Parallel = 2
	}
	id, err := st.CreateMultipart(ctx, key, opts.Meta)
	if err != nil {
		return nil, err
	}
	u := &Upload{st: st, url: st.URL(key), key: key, id: id, partSize: opts.PartSize, next: 2,
		sem: make(chan []byte, opts.Parallel+1)}
	u.ctx, u.cancel = context.WithCancel(ctx)
	for range opts.Parallel + 1 {
		u.sem <- nil
	}
	u.buf = u.getBuf()
	if u.buf == nil {
		u.abort()
		return nil, u.failure()
	}
	return u, nil
}

// getBuf takes a part buffer once fewer than Parallel uploads are running;
// nil when the context ended first.
func (u *Upload) getBuf() []byte {
	select {
	case b := <-u.sem:
		if b == nil {
			b = make([]byte, 0, u.partSize)
		}
		return b[:0]
	case <-u.ctx.Done():
		u.setErr(&Error{Op: "upload-part", URL: u.url, Err: u.ctx.Err()})
		return nil
	}
}

func (u *Upload) setErr(err error) {
	u.mu.Lock()
	if u.err == nil {
		u.err = err
	}
	u.mu.Unlock()
	u.cancel()
}

func (u *Upload) failure() error {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.err
}

// Sent returns the bytes the store has acknowledged so far.
func (u *Upload) Sent() int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	return u.sent
}

// send uploads buf as part number n in the background; a pooled buf (one
// from getBuf) goes back to the pool when done.
func (u *Upload) send(n int, buf []byte, pooled bool) {
	release := func() {
		if pooled {
			u.sem <- buf
		}
	}
	if n > MaxPartCount {
		u.setErr(&Error{Op: "upload-part", URL: u.url, Err: fmt.Errorf("more than %d parts of %d bytes: the part size is too small for this object", MaxPartCount, u.partSize)})
		release()
		return
	}
	u.wg.Add(1)
	go func() {
		defer u.wg.Done()
		p, err := u.st.UploadPart(u.ctx, u.key, u.id, n, bytes.NewReader(buf), int64(len(buf)))
		if err == nil && p.Size != int64(len(buf)) && p.Size != 0 {
			err = &Error{Op: "upload-part", URL: u.url, Err: fmt.Errorf("part %d: store took %d of %d bytes", n, p.Size, len(buf))}
		}
		if err != nil {
			u.setErr(err)
		} else {
			p.Number, p.Size = n, int64(len(buf))
			u.mu.Lock()
			u.parts = append(u.parts, p)
			u.sent += p.Size
			u.mu.Unlock()
		}
		release()
	}()
}

// Write buffers the bytes that follow part 1, uploading each full part.
func (u *Upload) Write(p []byte) (int, error) {
	if u.closed {
		return 0, &Error{Op: "upload-part", URL: u.url, Err: errors.New("upload already finished")}
	}
	written := 0
	for len(p) > 0 {
		if err := u.failure(); err != nil {
			return written, err
		}
		n := copy(u.buf[len(u.buf):cap(u.buf)], p)
		u.buf = u.buf[:len(u.buf)+n]
		p, written = p[n:], written+n
		if int64(len(u.buf)) == u.partSize {
			u.send(u.next, u.buf, true)
			u.next++
			if u.buf = u.getBuf(); u.buf == nil {
				return written, u.failure()
			}
		}
	}
	return written, nil
}

// WriteHead uploads head as part 1 and the buffered rest as the last part,
// then completes the upload: the object appears whole. head must be at
// least MinPartSize bytes unless nothing was written.
func (u *Upload) WriteHead(head []byte) error {
	if u.closed {
		return &Error{Op: "complete-multipart", URL: u.url, Err: errors.New("upload already finished")}
	}
	if u.next > 2 || len(u.buf) > 0 {
		if int64(len(head)) < MinPartSize {
			err := &Error{Op: "upload-part", URL: u.url, Err: fmt.Errorf("part 1 of %d bytes is below the %d-byte minimum", len(head), MinPartSize)}
			u.setErr(err)
			u.abort()
			return err
		}
	}
	if len(u.buf) > 0 {
		u.send(u.next, u.buf, true)
		u.buf = nil
	}
	if u.failure() == nil {
		u.send(1, head, false)
	}
	u.wg.Wait()
	if err := u.failure(); err != nil {
		u.abort()
		return err
	}
	u.mu.Lock()
	parts := append([]Part(nil), u.parts...)
	u.mu.Unlock()
	if err := u.st.CompleteMultipart(u.ctx, u.key, u.id, parts); err != nil {
		u.setErr(err)
		u.abort()
		return err
	}
	u.closed = true
	u.cancel()
	return nil
}

// Abort stops the upload and discards it with its parts; err, when not
// nil, is recorded as the reason. It returns the first error of the upload
// (or of the abort itself).
func (u *Upload) Abort(err error) error {
	if u.closed {
		return u.failure()
	}
	if err == nil {
		err = &Error{Op: "upload", URL: u.url, Err: errors.New("aborted")}
	}
	u.setErr(err)
	u.abort()
	return u.failure()
}

// abortPatience is how long abort keeps trying to discard the upload: an
// upload left behind keeps its parts (and their cost) until a lifecycle
// rule removes them, so a store that is briefly unreachable is waited for.
const abortPatience = 60 * time.Second

// abort waits for the running part uploads (cancelled) and aborts the
// upload with a fresh context, since the upload's own may have ended,
// retrying for abortPatience at most.
func (u *Upload) abort() {
	if u.closed {
		return
	}
	u.closed = true
	u.cancel()
	u.wg.Wait()
	ctx, cancel := context.WithTimeout(context.WithoutCancel(u.ctx), abortPatience)
	defer cancel()
	delay := 250 * time.Millisecond
	for {
		err := u.st.AbortMultipart(ctx, u.key, u.id)
		if err == nil || errors.Is(err, ErrNotFound) {
			return
		}
		select {
		case <-time.After(delay):
			delay = min(2*delay, 5*time.Second)
			continue
		case <-ctx.Done():
		}
		u.mu.Lock()
		u.err = fmt.Errorf("%w; and the upload could not be aborted, its parts may remain (upload ID %s): %v", u.err, u.id, err)
		u.mu.Unlock()
		return
	}
}
