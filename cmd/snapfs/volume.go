package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/cache"
	"github.com/snapfs/snapfs/disk"
	"github.com/snapfs/snapfs/objstore"
	"github.com/snapfs/snapfs/qcow2"
)

// volumeFlags are the flags of a local volume (import, serve --volume,
// mount --volume).
func volumeFlags() []cli.Flag {
	return []cli.Flag{
		&cli.StringFlag{Name: "state", Usage: "the volume's state file `PATH` (default: TARGET.snapfs-state)"},
		&cli.StringFlag{Name: "size", Usage: "make a new target `N` bytes (at least the virtual size; the extra reads as zeros)"},
	}
}

// localVolume is an image served through a local volume.
type localVolume struct {
	dev  *disk.Local
	im   *qcow2.Image
	info objstore.ObjectInfo // the object's size, ETag and metadata
}

// Close closes the device, its volume and the image.
func (v *localVolume) Close() error {
	err := v.dev.Close()
	if v.im != nil {
		err = errors.Join(err, v.im.Close())
	}
	return err
}

// openVolume opens the image at key of st and the local volume at target
// for it (created when missing; refused when made for another version).
func openVolume(c *cli.Context, st objstore.Store, key, target string, writable bool, m *objstore.Metrics) (*localVolume, error) {
	if key == "" || strings.HasSuffix(key, "/") {
		return nil, fmt.Errorf("%s: a local volume needs one image, not a prefix", st.URL(key))
	}
	ctx := c.Context
	var size int64
	if s := c.String("size"); s != "" {
		var err error
		if size, err = parseBytes("size", s); err != nil {
			return nil, err
		}
	}
	im, err := qcow2.Open(ctx, st, key, nil)
	if err != nil {
		if qcow2.Refused(err) {
			return nil, err
		}
		// A complete volume needs its object no more: serve it alone.
		statePath := c.String("state")
		if statePath == "" {
			statePath = cache.StatePathFor(target)
		}
		if vs, serr := cache.ReadVolumeState(statePath); serr == nil && vs.Complete && vs.URL == st.URL(key) {
			slog.Warn("the object cannot be read; serving the complete volume without it", "volume", target, "err", err)
			vol, verr := cache.OpenVolume(target, cache.VolumeSource{URL: vs.URL, ETag: vs.ETag, VirtualSize: vs.VirtualSize, Granularity: vs.Granularity},
				cache.VolumeOptions{StatePath: statePath, Size: size})
			if verr != nil {
				return nil, verr
			}
			l, lerr := disk.NewLocal(nil, vol, writable)
			if lerr != nil {
				vol.Close()
				return nil, lerr
			}
			return &localVolume{dev: l}, nil
		}
		return nil, err
	}
	info := im.Object()
	g := max(im.ClusterSize(), cache.DefaultGranularity)
	vopts := cache.VolumeOptions{StatePath: c.String("state"), Size: size}
	if s := c.String("flush-batch"); s != "" {
		if vopts.FlushBytes, err = parseBytes("flush-batch", s); err != nil {
			im.Close()
			return nil, err
		}
	}
	vol, err := cache.OpenVolume(target, cache.VolumeSource{URL: st.URL(key), ETag: info.ETag, VirtualSize: im.Size(), Granularity: g}, vopts)
	if err != nil {
		im.Close()
		return nil, err
	}
	d, err := disk.New(im, disk.Options{BlockSize: g, Metrics: m})
	if err == nil {
		var l *disk.Local
		if l, err = disk.NewLocal(d, vol, writable); err == nil {
			return &localVolume{dev: l, im: im, info: info}, nil
		}
		d.Close()
	}
	vol.Close()
	im.Close()
	return nil, err
}

// sharedDevice is a device that several users hold: Close does nothing
// (its owner closes the device).
type sharedDevice struct{ disk.Device }

// Close does nothing.
func (sharedDevice) Close() error { return nil }

// hydrate runs the background pass of v with the import flags.
func (v *localVolume) hydrate(ctx context.Context, opts disk.HydrateOptions) error {
	opts.Image = v.im
	opts.RawSHA256 = v.info.Metadata[metaRawSHA256] // written by snapfs export
	return v.dev.Hydrate(ctx, opts)
}
