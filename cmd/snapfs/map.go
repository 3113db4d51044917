package main

import (
	"bufio"
	"fmt"
	"io"
	"os"

	"github.com/urfave/cli/v2"

	"github.com/snapfs/snapfs/qcow2"
)

func mapCommand() *cli.Command {
	return &cli.Command{
		Name:      "map",
		Usage:     "print the image's extents, like qemu-img map",
		ArgsUsage: "URL",
		Flags:     withGlobal(&cli.BoolFlag{Name: "json", Usage: "print JSON like qemu-img map --output=json (plus \"compressed\")"}),
		Action:    withImage(runMap),
	}
}

// mapWindow is how much guest space one Map call covers, so that the
// extent list of a huge fragmented image is never held whole.
const mapWindow = 1 << 30

func runMap(c *cli.Context, im *qcow2.Image) error {
	w := bufio.NewWriterSize(os.Stdout, 64<<10)
	defer w.Flush()
	var p extentPrinter
	if c.Bool("json") {
		p = &jsonMapPrinter{w: w}
	} else {
		p = &humanMapPrinter{w: w}
	}
	if err := walkExtents(c, im, p.print); err != nil {
		return err
	}
	p.end()
	return nil
}

// walkExtents calls fn with the image's extents in guest order, merged
// across Map windows.
func walkExtents(c *cli.Context, im *qcow2.Image, fn func(qcow2.Extent)) error {
	var pending *qcow2.Extent
	for off := int64(0); off < im.Size(); off += mapWindow {
		n := min(int64(mapWindow), im.Size()-off)
		exts, err := im.Map(c.Context, off, n)
		if err != nil {
			return err
		}
		for _, e := range exts {
			if pending != nil && mergeable(*pending, e) {
				pending.Length += e.Length
				continue
			}
			if pending != nil {
				fn(*pending)
			}
			e := e
			pending = &e
		}
	}
	if pending != nil {
		fn(*pending)
	}
	return nil
}

func mergeable(a, b qcow2.Extent) bool {
	if a.Kind != b.Kind || a.Depth != b.Depth || a.File != b.File || a.Start+a.Length != b.Start {
		return false
	}
	if a.Kind == qcow2.Data {
		return a.HostOffset+a.Length == b.HostOffset
	}
	return true
}

type extentPrinter interface {
	print(qcow2.Extent)
	end()
}

type jsonMapPrinter struct {
	w io.Writer
	n int
}

func (p *jsonMapPrinter) print(e qcow2.Extent) {
	sep := ","
	if p.n == 0 {
		sep = "["
	}
	p.n++
	present := e.Kind != qcow2.Unallocated
	zero := e.Kind == qcow2.Zero || e.Kind == qcow2.Unallocated
	data := e.Kind == qcow2.Data || e.Kind == qcow2.Compressed
	fmt.Fprintf(p.w, "%s{ \"start\": %d, \"length\": %d, \"depth\": %d, \"present\": %t, \"zero\": %t, \"data\": %t, \"compressed\": %t",
		sep, e.Start, e.Length, e.Depth, present, zero, data, e.Kind == qcow2.Compressed)
	if e.Kind == qcow2.Data {
		fmt.Fprintf(p.w, ", \"offset\": %d", e.HostOffset)
	}
	fmt.Fprint(p.w, "}\n")
}

func (p *jsonMapPrinter) end() {
	if p.n == 0 {
		fmt.Fprint(p.w, "[")
	}
	fmt.Fprint(p.w, "]\n")
}

type humanMapPrinter struct {
	w    io.Writer
	head bool
}

func (p *humanMapPrinter) print(e qcow2.Extent) {
	if !p.head {
		fmt.Fprintf(p.w, "%-19s %-19s %-12s %-19s %s\n", "Offset", "Length", "Kind", "Mapped to", "File")
		p.head = true
	}
	mapped := "-"
	if e.Kind == qcow2.Data {
		mapped = fmt.Sprintf("%#x", e.HostOffset)
	}
	file := e.File
	if file == "" {
		file = "-"
	}
	fmt.Fprintf(p.w, "%-19s %-19s %-12s %-19s %s\n", fmt.Sprintf("%#x", e.Start), fmt.Sprintf("%#x", e.Length), e.Kind, mapped, file)
}

func (p *humanMapPrinter) end() {}
