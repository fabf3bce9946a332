// kjob dashboard: the one script. It follows a live run (its log and its status) and never
// builds markup from data: output is appended as text nodes, so a log holding <script> is text.
"use strict";

function sleep(ms) { return new Promise((resolve) => setTimeout(resolve, ms)); }

async function followLog(runId, pre) {
  const response = await fetch(`/ui/runs/${encodeURIComponent(runId)}/log?follow=true`,
                               { credentials: "same-origin", cache: "no-store" });
  if (!response.ok || !response.body) return;
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  pre.textContent = "";
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(decoder.decode(value, { stream: true }));
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }
}

async function watchStatus(runId, badge) {
  for (;;) {
    await sleep(1000);
    let state;
    try {
      const response = await fetch(`/ui/runs/${encodeURIComponent(runId)}/state`,
                                   { credentials: "same-origin", cache: "no-store" });
      if (!response.ok) continue;
      state = await response.json();
    } catch (err) {
      continue;  // a gateway restart: keep trying
    }
    const span = badge.querySelector(".status");
    if (span && span.textContent !== state.status) {
      span.textContent = state.status;
      span.className = `status s-${state.status}`;
    }
    if (state.final) {
      // The finished run's page has its exit code, duration, stored log and delivery.
      location.reload();
      return;
    }
  }
}

function start() {
  const run = document.getElementById("run");
  if (run && run.dataset.final === "false") {
    const runId = run.dataset.runId;
    followLog(runId, document.getElementById("log")).catch(() => {});
    watchStatus(runId, document.getElementById("run-status"));
  }
}

document.addEventListener("DOMContentLoaded", start);
