package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"syscall"
)

// Whence values of lseek(2) that os does not name.
const (
	seekData = 3 // SEEK_DATA
	seekHole = 4 // SEEK_HOLE
)

// rawSource is a raw disk to read once, in order: a file or block device
// (which also finds its holes with SEEK_DATA/SEEK_HOLE), or stdin.
type rawSource struct {
	f     *os.File
	name  string
	size  int64
	holes bool // SEEK_DATA works on f
}

// openRawSource opens path ("-" for stdin, whose size must be given) and
// returns it with its size: a file's size, or a block device's.
func openRawSource(path string, stdinSize int64) (*rawSource, error) {
	if path == "-" {
		if stdinSize < 0 {
			return nil, errors.New("reading stdin needs --size")
		}
		return &rawSource{f: os.Stdin, name: "stdin", size: stdinSize}, nil
	}
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	s := &rawSource{f: f, name: path}
	switch {
	case fi.Mode().IsRegular():
		s.size = fi.Size()
	case fi.Mode()&os.ModeDevice != 0:
		// A block device: its size is where SEEK_END lands.
		if s.size, err = f.Seek(0, io.SeekEnd); err == nil {
			_, err = f.Seek(0, io.SeekStart)
		}
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("%s: size of the device: %w", path, err)
		}
	default:
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file or a block device (use - and --size for a stream)", path)
	}
	if stdinSize >= 0 && stdinSize != s.size {
		f.Close()
		return nil, fmt.Errorf("%s: --size %d does not match its size %d", path, stdinSize, s.size)
	}
	if _, err := f.Seek(0, seekData); err == nil || errors.Is(err, syscall.ENXIO) {
		s.holes = true
	}
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		f.Close()
		return nil, err
	}
	return s, nil
}

// reader returns what qcow2.WriteStream reads: the file, with hole
// finding when the file system supports it.
func (s *rawSource) reader() io.Reader {
	if s.holes {
		return holeFile{s.f, s.size}
	}
	return struct{ io.Reader }{s.f}
}

// Close closes the source (not stdin).
func (s *rawSource) Close() error {
	if s.f == os.Stdin {
		return nil
	}
	return s.f.Close()
}

// holeFile implements qcow2.HoleSeeker over lseek SEEK_DATA/SEEK_HOLE.
type holeFile struct {
	*os.File
	size int64
}

// NextData returns the data range at or after off; [size, size) when
// none is left.
func (h holeFile) NextData(off int64) (int64, int64, error) {
	start, err := h.Seek(off, seekData)
	if errors.Is(err, syscall.ENXIO) {
		return h.size, h.size, nil
	}
	if err != nil {
		return 0, 0, err
	}
	end, err := h.Seek(start, seekHole)
	if errors.Is(err, syscall.ENXIO) {
		end = h.size
	} else if err != nil {
		return 0, 0, err
	}
	return start, min(end, h.size), nil
}
