package ally

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/godbus/dbus/v5"
)

// The longest Version or Commit, and the longest Description, in bytes: the broker's
// bounds (docs/dbus-api.md, Report).
const (
	MaxVersionBytes     = 256
	MaxDescriptionBytes = 1024
)

// TasksInterval is the least time between two task counts sent to the broker.
const TasksInterval = 50 * time.Millisecond

// ReportValues is what an instance tells the broker about itself; `ally status` shows
// it. An empty field is not sent, so it keeps what was reported before.
type ReportValues struct {
	Version     string
	Commit      string
	Description string
}

// reporter keeps what this instance reported, and sends its task count: one call at a
// time, at most one per TasksInterval, the latest count winning, so a busy server
// never floods the broker.
type reporter struct {
	mu       sync.Mutex
	values   ReportValues
	tasks    uint32
	sent     uint32
	sentAny  bool
	inFlight bool
}

var reports reporter

// Report sends the non-empty fields of v to the broker, replacing what was reported
// for them before. In simulate mode it only keeps them (see Reported). A field over
// its bound (MaxVersionBytes, MaxDescriptionBytes) is ErrLimitExceeded, before
// anything is sent.
func Report(v ReportValues) error {
	fields := map[string]dbus.Variant{}
	for _, f := range []struct {
		key, value string
		max        int
	}{
		{"version", v.Version, MaxVersionBytes},
		{"commit", v.Commit, MaxVersionBytes},
		{"description", v.Description, MaxDescriptionBytes},
	} {
		if f.value == "" {
			continue
		}
		if len(f.value) > f.max {
			return &Error{Method: "Report", Name: errLimitExceeded, Message: fmt.Sprintf(
				"report key %q is %d bytes long: at most %d bytes", f.key, len(f.value), f.max)}
		}
		fields[f.key] = dbus.MakeVariant(f.value)
	}
	if Managed() && len(fields) > 0 {
		if _, err := self().call(context.Background(), "Report", fields); err != nil {
			return err
		}
	}
	reports.mu.Lock()
	defer reports.mu.Unlock()
	if v.Version != "" {
		reports.values.Version = v.Version
	}
	if v.Commit != "" {
		reports.values.Commit = v.Commit
	}
	if v.Description != "" {
		reports.values.Description = v.Description
	}
	return nil
}

// Reported returns what this instance reported so far.
func Reported() ReportValues {
	reports.mu.Lock()
	defer reports.mu.Unlock()
	return reports.values
}

// Tasks is the task count now (see TaskStarted).
func Tasks() uint32 {
	reports.mu.Lock()
	defer reports.mu.Unlock()
	return reports.tasks
}

// TaskStarted counts one more task (a request, a job) until TaskDone. While this
// instance drains after a reload, `ally status` shows the tasks it has left. Counts
// are sent in the background (see TasksInterval).
func TaskStarted() { reports.change(func(n uint32) uint32 { return n + 1 }) }

// TaskDone counts one task fewer.
func TaskDone() {
	reports.change(func(n uint32) uint32 {
		if n == 0 {
			return 0
		}
		return n - 1
	})
}

// SetTasks sets the task count, for an app that counts its own work.
func SetTasks(n uint32) { reports.change(func(uint32) uint32 { return n }) }

func (r *reporter) change(f func(uint32) uint32) {
	r.mu.Lock()
	r.tasks = f(r.tasks)
	start := Managed() && !r.inFlight && (!r.sentAny || r.tasks != r.sent)
	if start {
		r.inFlight = true
	}
	r.mu.Unlock()
	if start {
		go r.send(self())
	}
}

// send reports the latest count until the broker has it.
func (r *reporter) send(in *instance) {
	for {
		r.mu.Lock()
		n := r.tasks
		if r.sentAny && n == r.sent {
			r.inFlight = false
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		// A refused call (the instance is exiting) has nothing to retry.
		_, _ = in.call(context.Background(), "Report", map[string]dbus.Variant{"tasks": dbus.MakeVariant(n)})
		r.mu.Lock()
		r.sent, r.sentAny = n, true
		r.mu.Unlock()
		time.Sleep(TasksInterval)
	}
}
