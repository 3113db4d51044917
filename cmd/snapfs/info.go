package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"
	"time"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/qcow2"
)

func infoCommand() *cli.Command {
	return &cli.Command{
		Name:      "info",
		Usage:     "describe an image, like qemu-img info, with the object's facts",
		ArgsUsage: "URL",
		Flags:     withGlobal(&cli.BoolFlag{Name: "json", Usage: "print JSON (the keys of qemu-img info --output=json, plus snapfs's own)"}),
		Action:    runInfo,
	}
}

func runInfo(c *cli.Context) error {
	u, err := oneURL(c)
	if err != nil {
		return err
	}
	info, err := describe(c, u)
	if err != nil {
		return err
	}
	if c.Bool("json") {
		return writeJSON(os.Stdout, infoJSON(info))
	}
	printInfo(os.Stdout, info)
	return nil
}

// describe returns the Info of the image at u, also for an image that
// cannot be served (Servable false, Reason set).
func describe(c *cli.Context, u string) (*qcow2.Info, error) {
	st, key, err := openStore(c, u)
	if err != nil {
		return nil, err
	}
	im, err := qcow2.Open(c.Context, st, key, nil)
	if errors.Is(err, qcow2.ErrUnsupported) {
		return qcow2.Inspect(c.Context, st, key)
	}
	if err != nil {
		return nil, err
	}
	defer im.Close()
	return im.Info(c.Context)
}

func writeJSON(w io.Writer, v any) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "    ")
	return enc.Encode(v)
}

// infoJSON shapes info like `qemu-img info --output=json`, plus snapfs keys.
func infoJSON(in *qcow2.Info) map[string]any {
	m := map[string]any{
		"filename":        in.URL,
		"url":             in.URL,
		"format":          in.Format,
		"virtual-size":    in.VirtualSize,
		"cluster-size":    in.ClusterSize,
		"dirty-flag":      in.Dirty,
		"object-size":     in.ObjectSize,
		"actual-size":     in.ObjectSize,
		"etag":            in.ETag,
		"allocated-bytes": in.AllocatedBytes,
		"servable":        in.Servable,
	}
	if !in.LastModified.IsZero() {
		m["last-modified"] = in.LastModified.UTC().Format(time.RFC3339)
	}
	if !in.Servable {
		m["reason"] = in.Reason
	}
	if in.BackingFile != "" {
		m["backing-filename"] = in.BackingFile
		if in.FullBackingFile != "" {
			m["full-backing-filename"] = in.FullBackingFile
		}
		if in.BackingFormat != "" {
			m["backing-filename-format"] = in.BackingFormat
		}
	}
	if in.Backing != nil {
		m["backing-image"] = infoJSON(in.Backing)
	}
	if in.Format != "qcow2" {
		return m
	}
	data := map[string]any{
		"compat":           in.Compat,
		"compression-type": in.CompressionType,
		"lazy-refcounts":   in.LazyRefcounts,
		"refcount-bits":    in.RefcountBits,
		"corrupt":          in.Corrupt,
		"extended-l2":      in.ExtendedL2,
	}
	if in.DataFile != "" {
		data["data-file"] = in.DataFile
		data["data-file-raw"] = in.DataFileRaw
	}
	if len(in.Bitmaps) > 0 {
		bms := []map[string]any{}
		for _, b := range in.Bitmaps {
			flags := b.Flags
			if flags == nil {
				flags = []string{}
			}
			bms = append(bms, map[string]any{"name": b.Name, "granularity": b.Granularity, "flags": flags})
		}
		data["bitmaps"] = bms
	}
	var unknown []string
	for _, f := range in.Incompatible {
		unknown = append(unknown, fmt.Sprintf("incompatible:%d:%s", f.Bit, f.Name))
	}
	if in.UnknownCompat != 0 || in.UnknownAutoclear != 0 {
		data["unknown-compatible"] = in.UnknownCompat
		data["unknown-autoclear"] = in.UnknownAutoclear
	}
	if len(unknown) > 0 {
		data["incompatible-features"] = unknown
	}
	m["format-specific"] = map[string]any{"type": "qcow2", "data": data}
	if len(in.Snapshots) > 0 {
		snaps := []map[string]any{}
		for _, s := range in.Snapshots {
			snaps = append(snaps, map[string]any{
				"id":            s.ID,
				"name":          s.Name,
				"vm-state-size": s.VMStateSize,
				"date-sec":      s.Date.Unix(),
				"date-nsec":     s.Date.Nanosecond(),
				"vm-clock-nsec": s.VMClockNS,
			})
		}
		m["snapshots"] = snaps
	}
	return m
}

// printInfo prints info in the layout of `qemu-img info`.
func printInfo(w io.Writer, in *qcow2.Info) {
	fmt.Fprintf(w, "image: %s\n", in.URL)
	fmt.Fprintf(w, "file format: %s\n", in.Format)
	fmt.Fprintf(w, "virtual size: %s (%d bytes)\n", humanSize(in.VirtualSize), in.VirtualSize)
	fmt.Fprintf(w, "object size: %s (%d bytes)\n", humanSize(in.ObjectSize), in.ObjectSize)
	if in.Format == "qcow2" {
		fmt.Fprintf(w, "allocated: %s (%d bytes)\n", humanSize(in.AllocatedBytes), in.AllocatedBytes)
		fmt.Fprintf(w, "cluster_size: %d\n", in.ClusterSize)
	}
	if in.BackingFile != "" {
		fmt.Fprintf(w, "backing file: %s", in.BackingFile)
		if in.FullBackingFile != "" {
			fmt.Fprintf(w, " (actual path: %s)", in.FullBackingFile)
		}
		fmt.Fprintln(w)
		if in.BackingFormat != "" {
			fmt.Fprintf(w, "backing file format: %s\n", in.BackingFormat)
		}
	}
	if in.ETag != "" {
		fmt.Fprintf(w, "etag: %s\n", in.ETag)
	}
	if !in.LastModified.IsZero() {
		fmt.Fprintf(w, "last modified: %s\n", in.LastModified.UTC().Format(time.RFC3339))
	}
	if len(in.Snapshots) > 0 {
		fmt.Fprintln(w, "Snapshot list:")
		fmt.Fprintf(w, "%-10s%-17s%10s%21s%16s\n", "ID", "TAG", "VM SIZE", "DATE", "VM CLOCK")
		for _, s := range in.Snapshots {
			clock := time.Duration(s.VMClockNS)
			fmt.Fprintf(w, "%-10s%-17s%10s%21s%16s\n", s.ID, s.Name, humanSize(int64(s.VMStateSize)),
				s.Date.Local().Format("2006-01-02 15:04:05"),
				fmt.Sprintf("%02d:%02d:%02d.%03d", int(clock.Hours()), int(clock.Minutes())%60, int(clock.Seconds())%60, clock.Milliseconds()%1000))
		}
	}
	if in.Format == "qcow2" {
		fmt.Fprintln(w, "Format specific information:")
		fmt.Fprintf(w, "    compat: %s\n", in.Compat)
		fmt.Fprintf(w, "    compression type: %s\n", in.CompressionType)
		fmt.Fprintf(w, "    lazy refcounts: %t\n", in.LazyRefcounts)
		if len(in.Bitmaps) > 0 {
			fmt.Fprintln(w, "    bitmaps:")
			for _, b := range in.Bitmaps {
				fmt.Fprintf(w, "        [%s] granularity %d flags [%s]\n", b.Name, b.Granularity, strings.Join(b.Flags, ", "))
			}
		}
		fmt.Fprintf(w, "    refcount bits: %d\n", in.RefcountBits)
		fmt.Fprintf(w, "    corrupt: %t\n", in.Corrupt)
		fmt.Fprintf(w, "    extended l2: %t\n", in.ExtendedL2)
		if in.DataFile != "" {
			fmt.Fprintf(w, "    data file: %s\n", in.DataFile)
			fmt.Fprintf(w, "    data file raw: %t\n", in.DataFileRaw)
		}
		if in.Dirty {
			fmt.Fprintln(w, "    dirty: true")
		}
	}
	if in.Servable {
		fmt.Fprintln(w, "servable: yes")
	} else {
		fmt.Fprintf(w, "servable: no: %s\n", in.Reason)
	}
	if in.Backing != nil {
		fmt.Fprintln(w)
		fmt.Fprintln(w, "backing image:")
		printInfo(w, in.Backing)
	}
}

// humanSize formats n in binary units the way qemu-img does ("1 GiB").
func humanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	v := float64(n)
	i := 0
	for v >= 1024 && i < len(units)-1 {
		v /= 1024
		i++
	}
	if i == 0 {
		return fmt.Sprintf("%d B", n)
	}
	s := fmt.Sprintf("%.3g", v)
	return s + " " + units[i]
}
