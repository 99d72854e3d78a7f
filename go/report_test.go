package ally

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/godbus/dbus/v5"
)

// testReport runs in the suite: in simulate mode the values are kept; under a broker
// they reach its status, the task count once the background sender caught up.
func testReport(t *testing.T) {
	err := Report(ReportValues{Version: strings.Repeat("v", MaxVersionBytes+1)})
	if !errors.Is(err, ErrLimitExceeded) || !strings.Contains(err.Error(), "at most 256 bytes") {
		t.Fatalf("a 257-byte version: %v", err)
	}
	must(t, Report(ReportValues{Version: "go-1", Commit: "c0ffee"}))
	must(t, Report(ReportValues{Description: "the suite"}))
	want := ReportValues{Version: "go-1", Commit: "c0ffee", Description: "the suite"}
	if got := Reported(); got != want {
		t.Fatalf("Reported() = %+v, want %+v", got, want)
	}
	before := Tasks()
	for i := 0; i < 100; i++ {
		TaskStarted()
	}
	for i := 0; i < 98; i++ {
		TaskDone()
	}
	if got := Tasks(); got != before+2 {
		t.Fatalf("Tasks() = %d after 100 started and 98 done, want %d", got, before+2)
	}
	if Managed() {
		waitUntil(t, "the broker has the report and the last count", 10*time.Second, func() bool {
			r := brokerReport(t)
			return r["version"] == "go-1" && r["commit"] == "c0ffee" &&
				r["description"] == "the suite" && r["tasks"] == before+2
		})
	}
	SetTasks(before)
	if Managed() {
		waitUntil(t, "the broker has the count set", 10*time.Second, func() bool {
			return brokerReport(t)["tasks"] == before
		})
	}
}

// brokerReport is what the broker's Status says this instance reported.
func brokerReport(t *testing.T) map[string]interface{} {
	t.Helper()
	c, err := self().call(context.Background(), "Status")
	must(t, err)
	var status map[string]dbus.Variant
	must(t, c.Store(&status))
	got := map[string]interface{}{}
	all, ok := status["instance_app_reports"].Value().(map[uint64]map[string]dbus.Variant)
	if !ok {
		t.Fatalf("instance_app_reports is %s", status["instance_app_reports"].Signature())
	}
	for key, value := range all[ID()] {
		got[key] = value.Value()
	}
	return got
}
