package objstore

import (
	"context"
	"crypto/x509"
	"errors"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"syscall"
)

// ErrInvalidKey is returned for a key a store refuses: absolute, escaping
// the store's root with "..", or naming one of the store's internal files.
var ErrInvalidKey = errors.New("invalid key")

// newError builds the *Error every backend returns. A *url.Error from
// net/http is replaced by its cause, because its text carries the full
// request URL (query string and signature included).
func newError(op, u string, status int, err error) *Error {
	return &Error{Op: op, URL: u, Status: status, Err: redactURLError(err)}
}

// redactURLError strips every *url.Error layer from err: url.Error puts the
// whole request URL, signature included, into its text.
func redactURLError(err error) error {
	for {
		var ue *url.Error
		if !errors.As(err, &ue) {
			return err
		}
		if ue.Err == nil {
			return errors.New(strings.ToLower(ue.Op) + " request failed")
		}
		// Anything wrapped around the url.Error may repeat its text, so
		// keep only the cause.
		err = ue.Err
	}
}

// statusError maps an HTTP status code to the sentinel it stands for, or to
// a plain error carrying the status text.
func statusError(status int) error {
	switch status {
	case http.StatusNotFound:
		return ErrNotFound
	case http.StatusPreconditionFailed:
		return ErrChanged
	case http.StatusForbidden, http.StatusUnauthorized:
		return ErrForbidden
	case http.StatusRequestedRangeNotSatisfiable:
		return ErrRange
	case http.StatusNotImplemented, http.StatusMethodNotAllowed:
		return ErrNotSupported
	}
	if t := http.StatusText(status); t != "" {
		return errors.New(strings.ToLower(t))
	}
	return errors.New("unexpected status")
}

// errTransient marks a failure that is worth retrying whatever its HTTP
// status says (for example S3's RequestTimeout, which comes as a 400).
var errTransient = errors.New("transient failure")

type transientError struct{ err error }

func (e transientError) Error() string   { return e.err.Error() }
func (e transientError) Unwrap() []error { return []error{e.err, errTransient} }

// IsRetryable reports whether err is a failure that a new attempt may cure:
// HTTP 408, 429 and 5xx, timeouts, refused or reset connections, and a body
// cut short (io.ErrUnexpectedEOF). Missing, forbidden, changed objects,
// unsatisfiable ranges, unsupported operations, invalid keys and context
// cancellation are final, and so is io.EOF.
func IsRetryable(err error) bool {
	if err == nil || err == io.EOF {
		return false
	}
	for _, final := range []error{ErrNotFound, ErrChanged, ErrForbidden, ErrRange, ErrNotSupported, ErrInvalidKey, context.Canceled} {
		if errors.Is(err, final) {
			return false
		}
	}
	if errors.Is(err, errTransient) {
		return true
	}
	var oe *Error
	if errors.As(err, &oe) && oe.Status != 0 {
		s := oe.Status
		return s == http.StatusRequestTimeout || s == http.StatusTooManyRequests || s >= 500
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ua x509.UnknownAuthorityError
	var ch x509.CertificateInvalidError
	var hn x509.HostnameError
	if errors.As(err, &ua) || errors.As(err, &ch) || errors.As(err, &hn) {
		return false
	}
	for _, errno := range []syscall.Errno{syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED, syscall.EPIPE, syscall.ETIMEDOUT, syscall.EHOSTUNREACH, syscall.ENETUNREACH} {
		if errors.Is(err, errno) {
			return true
		}
	}
	var dns *net.DNSError
	if errors.As(err, &dns) {
		return dns.IsTimeout || dns.IsTemporary
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		return true
	}
	var op *net.OpError
	if errors.As(err, &op) {
		return true
	}
	msg := err.Error()
	for _, s := range []string{"connection reset", "broken pipe", "server closed idle connection", "use of closed network connection", "unexpected EOF", "GOAWAY", "connection refused"} {
		if strings.Contains(msg, s) {
			return true
		}
	}
	return false
}

// statusOf returns the HTTP status recorded in err's chain, or 0.
func statusOf(err error) int {
	var oe *Error
	if errors.As(err, &oe) {
		return oe.Status
	}
	return 0
}
