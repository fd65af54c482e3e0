// The web-ui browser test, driven by Playwright (playwright-core) in Debian's Chromium; run by
// tests/e2e/web_ui.rs, which starts web-ui and prepares the folders. Arguments: the address
// web-ui printed (with the token), the dataset folder, the model, the output folder, the sample
// prompt file and a folder for screenshots. Exits non-zero, naming the step, on any failure.
import { createRequire } from "node:module";

const require = createRequire(process.env.PLAYWRIGHT_CORE + "/");
const { chromium } = require("playwright-core");

const [address, dataset, model, output, prompts, shots] = process.argv.slice(2);
const base = new URL(address).origin;
let step = "start";
const log = (text) => { step = text; console.log("browser: " + text); };

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM,
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await (await browser.newContext({ viewport: { width: 1280, height: 1000 } })).newPage();
  page.setDefaultTimeout(30000);

  log("a request without the token is refused");
  const bare = await page.goto(base + "/");
  if (bare.status() !== 401) throw new Error(`page without token: status ${bare.status()}`);

  log("open the page with the token");
  await page.goto(address);
  if (new URL(page.url()).search !== "") throw new Error("the token stayed in the address: " + page.url());
  await page.waitForFunction(() => document.getElementById("folders").textContent.startsWith("folders:"));

  log("load the dataset and see the lint report");
  await page.fill("#dataset-dir", dataset);
  await page.fill("#dataset-resolution", "256,256");
  await page.click("#load-dataset");
  await page.waitForSelector("#lint-counts");
  const counts = await page.textContent("#lint-counts");
  if (!counts.startsWith("6 images checked")) throw new Error("lint report: " + counts);
  const cards = await page.locator(".card").count();
  if (cards !== 6) throw new Error(`image grid: ${cards} cards`);
  if ((await page.locator("#buckets .bar-row").count()) < 1) throw new Error("no bucket histogram");

  log("edit a caption");
  const first = page.locator(".card").first();
  await first.locator("textarea").fill("an astronaut, edited in the page");
  await first.locator("button").click();
  await first.locator(".message", { hasText: "saved" }).waitFor();
  await page.screenshot({ path: shots + "/dataset.png", fullPage: true });

  log("fill the form and start a 4-step run");
  await page.click('nav button[data-tab="train"]');
  await page.selectOption("#preset", "Quick check (4 steps, 256²)");
  await page.click("#apply-preset");
  const form = (name) => `#train-form [name="${name}"]`;
  await page.fill(form("pretrained_model_name_or_path"), model);
  await page.fill(form("train_data_dir"), dataset);
  await page.fill(form("output_dir"), output);
  await page.fill(form("output_name"), "webui");
  await page.fill(form("sample_prompts"), prompts);
  await page.fill(form("sample_every_n_steps"), "4");
  await page.click("#start");
  await page.waitForSelector("#tab-live:not(.hidden)");

  log("see the loss chart update and the run finish");
  await page.waitForFunction(() => document.getElementById("run-state").textContent !== "no run");
  await page.waitForFunction(() => {
    const state = document.getElementById("run-state").textContent;
    if (state.startsWith("failed")) return true;
    return state === "finished" && document.getElementById("loss-chart").dataset.points === "4";
  }, null, { timeout: 120000 });
  const state = await page.textContent("#run-state");
  if (state !== "finished") throw new Error("run: " + state + "\n" + (await page.textContent("#run-log")));
  if ((await page.locator("#loss-chart polyline").count()) !== 1) throw new Error("no loss line drawn");
  await page.waitForSelector("#contact-sheet:not(.hidden)");
  await page.screenshot({ path: shots + "/live.png", fullPage: true });

  log("see the LoRA in the history");
  await page.click('nav button[data-tab="history"]');
  await page.locator(".lora-name", { hasText: "webui.safetensors" }).waitFor();
  const row = page.locator("tr.lora", { hasText: "webui.safetensors" });
  const cells = await row.locator("td").allTextContents();
  if (cells[2] !== "4" || cells[4] !== "4") throw new Error("history row (dim, steps): " + cells.join(" | "));
  await row.locator("button", { hasText: "Check" }).click();
  await page.waitForFunction(() => document.getElementById("lora-report").textContent.includes("lora_tensors"));
  await page.screenshot({ path: shots + "/history.png", fullPage: true });
  log("done");
} catch (error) {
  console.error(`browser test failed at "${step}": ${error.message}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
