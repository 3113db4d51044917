package objstore

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"strings"
	"time"
)

// RetryPolicy configures WithRetry. Zero fields take the defaults.
type RetryPolicy struct {
	MaxAttempts    int           // attempts per operation, first included (default 8)
	BaseDelay      time.Duration // backoff before the 2nd attempt, doubling after (default 100ms)
	MaxDelay       time.Duration // cap on one backoff (default 5s)
	AttemptTimeout time.Duration // deadline of one attempt (0: none)
	Logger         *slog.Logger  // receives one Warn per retry (default slog.Default())
}

// Default retry settings.
const (
	DefaultMaxAttempts = 8
	DefaultBaseDelay   = 100 * time.Millisecond
	DefaultMaxDelay    = 5 * time.Second
)

func (p RetryPolicy) withDefaults() RetryPolicy {
	if p.MaxAttempts <= 0 {
		p.MaxAttempts = DefaultMaxAttempts
	}
	if p.BaseDelay <= 0 {
		p.BaseDelay = DefaultBaseDelay
	}
	if p.MaxDelay <= 0 {
		p.MaxDelay = DefaultMaxDelay
	}
	if p.MaxDelay < p.BaseDelay {
		p.MaxDelay = p.BaseDelay
	}
	if p.Logger == nil {
		p.Logger = slog.Default()
	}
	return p
}

// backoff returns the delay before attempt+1: full jitter, uniform in
// [0, min(MaxDelay, BaseDelay*2^(attempt-1))].
func (p RetryPolicy) backoff(attempt int) time.Duration {
	ceiling := p.MaxDelay
	if attempt-1 < 32 {
		if d := p.BaseDelay << (attempt - 1); d > 0 && d < ceiling {
			ceiling = d
		}
	}
	return time.Duration(rand.Int64N(int64(ceiling) + 1))
}

// WithRetry returns a Store that retries s's operations that fail with a
// retryable error (see IsRetryable) with exponential backoff and full
// jitter. A read cut short resumes: the next attempt asks only for the
// bytes still missing. Put and UploadPart are retried only when their
// body is an io.ReadSeeker, which is rewound before each new attempt.
// When every attempt failed the error says "giving up after N attempts".
func WithRetry(s Store, p RetryPolicy) Store {
	return &retryStore{s: s, p: p.withDefaults()}
}

type retryStore struct {
	s Store
	p RetryPolicy
}

// giveUpError is the cause reported once attempts are exhausted.
type giveUpError struct {
	attempts int
	last     error
}

func (e *giveUpError) Error() string {
	text := e.last.Error()
	var oe *Error
	if errors.As(e.last, &oe) {
		// The outer *Error already names the operation and object.
		text = strings.TrimPrefix(text, oe.Op+" "+oe.URL+": ")
	}
	return fmt.Sprintf("giving up after %d attempts: %s", e.attempts, text)
}

func (e *giveUpError) Unwrap() error { return e.last }

// do runs fn until it succeeds, fails for good, or runs out of attempts.
func (r *retryStore) do(ctx context.Context, op, key string, fn func(context.Context) error) error {
	for attempt := 1; ; attempt++ {
		actx, cancel := ctx, context.CancelFunc(func() {})
		if r.p.AttemptTimeout > 0 {
			actx, cancel = context.WithTimeout(ctx, r.p.AttemptTimeout)
		}
		err := fn(actx)
		cancel()
		if err == nil {
			return nil
		}
		if ctx.Err() != nil || !IsRetryable(err) {
			return err
		}
		if attempt >= r.p.MaxAttempts {
			return &Error{Op: op, URL: r.s.URL(key), Err: &giveUpError{attempts: attempt, last: err}}
		}
		delay := r.p.backoff(attempt)
		r.p.Logger.Warn("objstore: retrying",
			"op", op, "url", r.s.URL(key), "attempt", attempt, "max_attempts", r.p.MaxAttempts,
			"delay", delay, "err", err.Error())
		t := time.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
	}
}

// URL returns s.URL(key).
func (r *retryStore) URL(key string) string { return r.s.URL(key) }

// Stat retries the underlying Stat.
func (r *retryStore) Stat(ctx context.Context, key string) (ObjectInfo, error) {
	var info ObjectInfo
	err := r.do(ctx, "stat", key, func(ctx context.Context) error {
		var err error
		info, err = r.s.Stat(ctx, key)
		return err
	})
	return info, err
}

// ReadAt retries the read, each attempt asking only for the bytes the
// previous ones did not deliver.
func (r *retryStore) ReadAt(ctx context.Context, key string, p []byte, off int64, opts ReadOptions) (int, error) {
	got := 0
	eof := false
	err := r.do(ctx, "read", key, func(ctx context.Context) error {
		n, err := r.s.ReadAt(ctx, key, p[got:], off+int64(got), opts)
		got += n
		switch {
		case err == io.EOF:
			eof = true
			return nil
		case err == nil && got < len(p):
			return &Error{Op: "read", URL: r.s.URL(key), Err: fmt.Errorf("short read without error: %w", io.ErrUnexpectedEOF)}
		}
		return err
	})
	if err != nil {
		return got, err
	}
	if eof {
		return got, io.EOF
	}
	return got, nil
}

// List retries the underlying List.
func (r *retryStore) List(ctx context.Context, prefix string) ([]ObjectInfo, error) {
	var out []ObjectInfo
	err := r.do(ctx, "list", prefix, func(ctx context.Context) error {
		var err error
		out, err = r.s.List(ctx, prefix)
		return err
	})
	return out, err
}

// rewinder returns a function that seeks r back to where it is now, or
// nil when r cannot seek.
func rewinder(r io.Reader) func() error {
	rs, ok := r.(io.ReadSeeker)
	if !ok {
		return nil
	}
	pos, err := rs.Seek(0, io.SeekCurrent)
	if err != nil {
		return nil
	}
	return func() error {
		_, err := rs.Seek(pos, io.SeekStart)
		return err
	}
}

// withBody runs fn with retries when the body can be rewound, else once.
func (r *retryStore) withBody(ctx context.Context, op, key string, body io.Reader, fn func(context.Context) error) error {
	rewind := rewinder(body)
	if rewind == nil {
		return fn(ctx)
	}
	first := true
	return r.do(ctx, op, key, func(ctx context.Context) error {
		if !first {
			if err := rewind(); err != nil {
				return &Error{Op: op, URL: r.s.URL(key), Err: fmt.Errorf("rewinding body: %w", err)}
			}
		}
		first = false
		return fn(ctx)
	})
}

// Put retries when body is an io.ReadSeeker.
func (r *retryStore) Put(ctx context.Context, key string, body io.Reader, size int64, meta map[string]string) error {
	return r.withBody(ctx, "put", key, body, func(ctx context.Context) error {
		return r.s.Put(ctx, key, body, size, meta)
	})
}

// Delete retries the underlying Delete.
func (r *retryStore) Delete(ctx context.Context, key string) error {
	return r.do(ctx, "delete", key, func(ctx context.Context) error { return r.s.Delete(ctx, key) })
}

// CreateMultipart retries the underlying CreateMultipart.
func (r *retryStore) CreateMultipart(ctx context.Context, key string, meta map[string]string) (string, error) {
	var id string
	err := r.do(ctx, "create-multipart", key, func(ctx context.Context) error {
		var err error
		id, err = r.s.CreateMultipart(ctx, key, meta)
		return err
	})
	return id, err
}

// UploadPart retries when body is an io.ReadSeeker.
func (r *retryStore) UploadPart(ctx context.Context, key, uploadID string, number int, body io.Reader, size int64) (Part, error) {
	var part Part
	err := r.withBody(ctx, "upload-part", key, body, func(ctx context.Context) error {
		var err error
		part, err = r.s.UploadPart(ctx, key, uploadID, number, body, size)
		return err
	})
	return part, err
}

// CompleteMultipart retries the underlying CompleteMultipart.
func (r *retryStore) CompleteMultipart(ctx context.Context, key, uploadID string, parts []Part) error {
	return r.do(ctx, "complete-multipart", key, func(ctx context.Context) error {
		return r.s.CompleteMultipart(ctx, key, uploadID, parts)
	})
}

// AbortMultipart retries the underlying AbortMultipart.
func (r *retryStore) AbortMultipart(ctx context.Context, key, uploadID string) error {
	return r.do(ctx, "abort-multipart", key, func(ctx context.Context) error {
		return r.s.AbortMultipart(ctx, key, uploadID)
	})
}
