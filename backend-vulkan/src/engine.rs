//! The Vulkan engine: instance and device selection, buffers with a
//! size-bucketed pool, compute pipelines (one per kernel variant, created on
//! first use and cached), and command recording into batched command buffers.
//!
//! Every op records one or more dispatches into the *current batch* (one
//! command buffer and one descriptor pool). A memory barrier goes before a
//! dispatch only when it depends on work recorded since the previous barrier
//! ([`Hazards`]: it reads or writes a buffer written since, or writes one read
//! since), so independent dispatches (the two gradient products of a linear
//! layer, say) may overlap on a GPU; which bindings a kernel writes comes from
//! its GLSL (`readonly` or not), read by the build script. A batch is
//! submitted when it is full (then the next one is recorded while the device
//! runs it) or when the host needs data
//! ([`Ctx::read`]), which submits and waits. A batch keeps every buffer it
//! touches alive until its fence signals, so a tensor dropped by the host is
//! only recycled into the pool after the device is done with it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use ash::vk;
use dcdit_core::{Error, Result};

include!(concat!(env!("OUT_DIR"), "/shaders.rs"));

/// Bytes of push constants every pipeline declares (the guaranteed minimum).
pub(crate) const PUSH_BYTES: usize = 128;
/// Dispatches recorded into one command buffer before it is submitted.
const BATCH_DISPATCHES: u32 = 512;

fn vkerr(what: &str) -> impl Fn(vk::Result) -> Error + '_ {
    move |e| Error::backend(format!("vulkan: {what}: {e:?}"))
}

/// A Vulkan device the loader reports (see [`devices`]).
#[derive(Debug, Clone)]
pub struct DeviceInfo {
    /// Index for `--device N`.
    pub index: usize,
    /// Driver-reported name.
    pub name: String,
    /// Device type (discrete, integrated, cpu, ...).
    pub kind: String,
    /// Vulkan API version `major.minor.patch`.
    pub api: String,
    /// Subgroup size, and whether subgroup arithmetic and shuffles are usable
    /// in compute (the `_sg` kernel variants need both).
    pub subgroup_size: u32,
    /// Subgroup arithmetic in compute shaders.
    pub subgroup_arithmetic: bool,
    /// Why the device cannot be used, if it cannot.
    pub unusable: Option<String>,
}

fn load_entry() -> Result<ash::Entry> {
    // SAFETY: loading the system Vulkan loader library; ash resolves its entry points.
    unsafe { ash::Entry::load() }.map_err(|e| {
        Error::backend(format!(
            "vulkan: cannot load the Vulkan loader (libvulkan.so.1): {e}. Install a loader and a \
             driver, e.g. `apt-get install libvulkan1 mesa-vulkan-drivers` (or run `bash scripts/setup.sh`)"
        ))
    })
}

fn create_instance(entry: &ash::Entry) -> Result<ash::Instance> {
    let app = vk::ApplicationInfo::default()
        .application_name(c"dcdit")
        .api_version(vk::API_VERSION_1_1);
    let ci = vk::InstanceCreateInfo::default().application_info(&app);
    // SAFETY: valid create info; the instance is destroyed by its owner.
    unsafe { entry.create_instance(&ci, None) }.map_err(vkerr("cannot create an instance"))
}

struct PhysInfo {
    pd: vk::PhysicalDevice,
    info: DeviceInfo,
    queue_family: Option<u32>,
}

fn describe(instance: &ash::Instance, pds: &[vk::PhysicalDevice]) -> Vec<PhysInfo> {
    pds.iter()
        .enumerate()
        .map(|(index, &pd)| {
            // SAFETY: pd comes from enumerate_physical_devices of this instance.
            let props = unsafe { instance.get_physical_device_properties(pd) };
            let name = props
                .device_name_as_c_str()
                .map(|c| c.to_string_lossy().into_owned())
                .unwrap_or_else(|_| "?".into());
            let v = props.api_version;
            let api = format!(
                "{}.{}.{}",
                vk::api_version_major(v),
                vk::api_version_minor(v),
                vk::api_version_patch(v)
            );
            let kind = format!("{:?}", props.device_type).to_lowercase();
            let mut sg = vk::PhysicalDeviceSubgroupProperties::default();
            let mut unusable = None;
            if v < vk::API_VERSION_1_1 {
                unusable = Some(format!("Vulkan {api} < 1.1"));
            } else {
                let mut p2 = vk::PhysicalDeviceProperties2::default().push_next(&mut sg);
                // SAFETY: the device supports 1.1, so properties2 is core.
                unsafe { instance.get_physical_device_properties2(pd, &mut p2) };
            }
            // SAFETY: as above.
            let qf = unsafe { instance.get_physical_device_queue_family_properties(pd) };
            let queue_family = qf
                .iter()
                .position(|q| q.queue_flags.contains(vk::QueueFlags::COMPUTE))
                .map(|i| i as u32);
            if queue_family.is_none() && unusable.is_none() {
                unusable = Some("no compute queue".into());
            }
            let lim = props.limits;
            if unusable.is_none()
                && (lim.max_compute_work_group_invocations < 256
                    || lim.max_compute_shared_memory_size < 16384
                    || lim.max_push_constants_size < PUSH_BYTES as u32)
            {
                unusable = Some(format!(
                    "needs 256 invocations per workgroup, 16 KiB shared memory and {PUSH_BYTES} \
                     bytes of push constants (has {}, {}, {})",
                    lim.max_compute_work_group_invocations,
                    lim.max_compute_shared_memory_size,
                    lim.max_push_constants_size
                ));
            }
            let subgroup_arithmetic = sg.supported_stages.contains(vk::ShaderStageFlags::COMPUTE)
                && sg.supported_operations.contains(
                    vk::SubgroupFeatureFlags::ARITHMETIC
                        | vk::SubgroupFeatureFlags::BASIC
                        | vk::SubgroupFeatureFlags::SHUFFLE,
                )
                && sg.subgroup_size >= 4;
            PhysInfo {
                pd,
                info: DeviceInfo {
                    index,
                    name,
                    kind,
                    api,
                    subgroup_size: sg.subgroup_size,
                    subgroup_arithmetic,
                    unusable,
                },
                queue_family,
            }
        })
        .collect()
}

/// Lists the Vulkan devices (an error when there is no loader or the
/// instance cannot be created).
pub fn devices() -> Result<Vec<DeviceInfo>> {
    let entry = load_entry()?;
    let instance = create_instance(&entry)?;
    // SAFETY: instance is valid.
    let pds = unsafe { instance.enumerate_physical_devices() };
    let out = pds
        .map(|pds| {
            describe(&instance, &pds)
                .into_iter()
                .map(|p| p.info)
                .collect()
        })
        .map_err(vkerr("cannot enumerate devices"));
    // SAFETY: nothing created from the instance remains.
    unsafe { instance.destroy_instance(None) };
    out
}

/// A raw buffer with its own memory allocation (mapped when host-visible).
pub(crate) struct RawBuf {
    pub(crate) buf: vk::Buffer,
    mem: vk::DeviceMemory,
    pub(crate) size: u64,
    pub(crate) ptr: *mut u8,
}

/// The logical device and the buffer pool (shared by the backend and every
/// live buffer, so it outlives both).
pub(crate) struct Device {
    _entry: ash::Entry,
    instance: ash::Instance,
    pub(crate) dev: ash::Device,
    queue: vk::Queue,
    queue_family: u32,
    mem_props: vk::PhysicalDeviceMemoryProperties,
    /// Device-local memory is also host-visible and coherent: map it directly.
    pub(crate) direct_map: bool,
    pub(crate) info: DeviceInfo,
    /// Free buffers by (size class, host staging).
    free: Mutex<HashMap<(u64, bool), Vec<RawBuf>>>,
}

// SAFETY: the raw mapped pointers are only dereferenced under the engine's
// synchronisation (a buffer is written by the host only when no batch uses it).
unsafe impl Send for Device {}
// SAFETY: as above; the free list is behind a mutex.
unsafe impl Sync for Device {}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: all users are gone (this is the last Arc); wait, then destroy.
        unsafe {
            let _ = self.dev.device_wait_idle();
            for (_, v) in self.free.get_mut().unwrap().drain() {
                for b in v {
                    self.dev.destroy_buffer(b.buf, None);
                    self.dev.free_memory(b.mem, None);
                }
            }
            self.dev.destroy_device(None);
            self.instance.destroy_instance(None);
        }
    }
}

/// Rounds a byte size up to its pool class (powers of two below 64 KiB,
/// eighths of the next power of two above).
fn size_class(bytes: u64) -> u64 {
    let b = bytes.max(16);
    let p = b.next_power_of_two();
    if p <= 65536 {
        p
    } else {
        let step = p / 8;
        b.div_ceil(step) * step
    }
}

impl Device {
    fn memory_type(&self, bits: u32, want: vk::MemoryPropertyFlags) -> Option<u32> {
        (0..self.mem_props.memory_type_count).find(|&i| {
            bits & (1 << i) != 0
                && self.mem_props.memory_types[i as usize]
                    .property_flags
                    .contains(want)
        })
    }

    fn alloc_raw(&self, size: u64, host: bool) -> Result<RawBuf> {
        let ci = vk::BufferCreateInfo::default()
            .size(size)
            .usage(
                vk::BufferUsageFlags::STORAGE_BUFFER
                    | vk::BufferUsageFlags::TRANSFER_SRC
                    | vk::BufferUsageFlags::TRANSFER_DST,
            )
            .sharing_mode(vk::SharingMode::EXCLUSIVE);
        // SAFETY: valid device and create info; errors are returned.
        unsafe {
            let buf = self
                .dev
                .create_buffer(&ci, None)
                .map_err(vkerr("create buffer"))?;
            let req = self.dev.get_buffer_memory_requirements(buf);
            let hv = vk::MemoryPropertyFlags::HOST_VISIBLE | vk::MemoryPropertyFlags::HOST_COHERENT;
            let ty = if host {
                self.memory_type(req.memory_type_bits, hv)
            } else {
                self.memory_type(req.memory_type_bits, vk::MemoryPropertyFlags::DEVICE_LOCAL)
                    .or_else(|| {
                        self.memory_type(req.memory_type_bits, vk::MemoryPropertyFlags::empty())
                    })
            };
            let Some(ty) = ty else {
                self.dev.destroy_buffer(buf, None);
                return Err(Error::backend("vulkan: no suitable memory type"));
            };
            let ai = vk::MemoryAllocateInfo::default()
                .allocation_size(req.size)
                .memory_type_index(ty);
            let mem = match self.dev.allocate_memory(&ai, None) {
                Ok(m) => m,
                Err(e) => {
                    self.dev.destroy_buffer(buf, None);
                    return Err(Error::backend(format!(
                        "vulkan: out of device memory allocating {size} bytes: {e:?}"
                    )));
                }
            };
            self.dev
                .bind_buffer_memory(buf, mem, 0)
                .map_err(vkerr("bind buffer memory"))?;
            let flags = self.mem_props.memory_types[ty as usize].property_flags;
            let ptr = if (host || self.direct_map) && flags.contains(hv) {
                self.dev
                    .map_memory(mem, 0, vk::WHOLE_SIZE, vk::MemoryMapFlags::empty())
                    .map_err(vkerr("map memory"))? as *mut u8
            } else {
                std::ptr::null_mut()
            };
            Ok(RawBuf {
                buf,
                mem,
                size,
                ptr,
            })
        }
    }
}

/// A pooled device buffer; returns to the pool when the last handle drops.
pub(crate) struct Buffer {
    pub(crate) raw: Option<RawBuf>,
    host: bool,
    class: u64,
    dev: Arc<Device>,
}

// SAFETY: see `Device`.
unsafe impl Send for Buffer {}
// SAFETY: see `Device`.
unsafe impl Sync for Buffer {}

impl Buffer {
    pub(crate) fn handle(&self) -> vk::Buffer {
        self.raw.as_ref().unwrap().buf
    }
    pub(crate) fn mapped(&self) -> *mut u8 {
        self.raw.as_ref().unwrap().ptr
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            if let Ok(mut f) = self.dev.free.lock() {
                f.entry((self.class, self.host)).or_default().push(raw);
            }
        }
    }
}

impl std::fmt::Debug for Buffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Buffer({} bytes)", self.class)
    }
}

struct Pipe {
    pipeline: vk::Pipeline,
    layout: vk::PipelineLayout,
    dsl: vk::DescriptorSetLayout,
    bindings: usize,
    /// Bit `i` set: binding `i` may be written (not declared `readonly`).
    written: u32,
}

/// The buffers read and written since the last barrier of a command buffer.
///
/// A new access needs a barrier first when it reads or writes a buffer written
/// since the barrier (read-after-write, write-after-write) or writes one read
/// since (write-after-read); the sets then restart from that access. Accesses
/// with no such conflict are recorded without a barrier, so the device may
/// run them concurrently.
#[derive(Default, Debug)]
pub(crate) struct Hazards {
    reads: Vec<u64>,
    writes: Vec<u64>,
}

impl Hazards {
    /// Records an access to buffers (by id); returns whether a barrier must
    /// be recorded before it.
    pub(crate) fn access(&mut self, reads: &[u64], writes: &[u64]) -> bool {
        let conflict = reads.iter().chain(writes).any(|b| self.writes.contains(b))
            || writes.iter().any(|b| self.reads.contains(b));
        if conflict {
            self.clear();
        }
        self.reads.extend_from_slice(reads);
        self.writes.extend_from_slice(writes);
        conflict
    }

    /// Forgets every access (after a full barrier).
    pub(crate) fn clear(&mut self) {
        self.reads.clear();
        self.writes.clear();
    }
}

struct Batch {
    cmd: vk::CommandBuffer,
    dpool: vk::DescriptorPool,
    fence: vk::Fence,
    keep: Vec<Arc<Buffer>>,
    dispatches: u32,
    submitted: bool,
    hazards: Hazards,
}

struct State {
    pipes: HashMap<&'static str, Pipe>,
    cmd_pool: vk::CommandPool,
    cur: Option<Batch>,
    inflight: Vec<Batch>,
    spare: Vec<Batch>,
}

/// The engine shared by clones of the backend.
pub(crate) struct Ctx {
    pub(crate) dev: Arc<Device>,
    state: Mutex<State>,
    /// Use the subgroup variant of kernels that have one.
    pub(crate) subgroup: bool,
    /// Tiny buffer bound to unused binding slots.
    pub(crate) dummy: Arc<Buffer>,
    /// `DCDIT_VK_FAULT_NO_BARRIERS=1`: records no barriers between dispatches,
    /// a deliberate fault that only exists so the synchronisation-validation
    /// test can show it catches missing barriers (results become undefined
    /// on a GPU).
    fault_no_barriers: bool,
    /// Commands recorded and barriers recorded before them.
    commands: std::sync::atomic::AtomicU64,
    barriers: std::sync::atomic::AtomicU64,
}

impl Drop for Ctx {
    fn drop(&mut self) {
        let dev = self.dev.clone();
        let st = self.state.get_mut().unwrap();
        // SAFETY: wait for the device, then destroy what this context created.
        unsafe {
            let _ = dev.dev.device_wait_idle();
            let mut all: Vec<Batch> = st.inflight.drain(..).collect();
            all.append(&mut st.spare);
            all.extend(st.cur.take());
            for b in all {
                dev.dev.destroy_descriptor_pool(b.dpool, None);
                dev.dev.destroy_fence(b.fence, None);
            }
            dev.dev.destroy_command_pool(st.cmd_pool, None);
            for (_, p) in st.pipes.drain() {
                dev.dev.destroy_pipeline(p.pipeline, None);
                dev.dev.destroy_pipeline_layout(p.layout, None);
                dev.dev.destroy_descriptor_set_layout(p.dsl, None);
            }
        }
    }
}

const SETS_PER_BATCH: u32 = BATCH_DISPATCHES + 8;
const MAX_BINDINGS: u32 = 8;

impl Ctx {
    /// Opens device `index` (the order of [`devices`]).
    pub(crate) fn new(index: usize) -> Result<Ctx> {
        let entry = load_entry()?;
        let instance = create_instance(&entry)?;
        // SAFETY: instance is valid.
        let pds = match unsafe { instance.enumerate_physical_devices() } {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: nothing else was created.
                unsafe { instance.destroy_instance(None) };
                return Err(Error::backend(format!(
                    "vulkan: cannot enumerate devices: {e:?}"
                )));
            }
        };
        let infos = describe(&instance, &pds);
        let fail = |msg: String| {
            // SAFETY: nothing else was created from the instance.
            unsafe { instance.destroy_instance(None) };
            Err(Error::backend(msg))
        };
        if infos.is_empty() {
            return fail(
                "vulkan: the loader found no Vulkan device (install a driver, e.g. \
                 mesa-vulkan-drivers for the lavapipe software device)"
                    .into(),
            );
        }
        let Some(p) = infos.get(index) else {
            return fail(format!(
                "vulkan: no device {index}; there are {} (see `dcdit-cli devices`)",
                infos.len()
            ));
        };
        if let Some(why) = &p.info.unusable {
            return fail(format!(
                "vulkan: device {index} ({}) lacks a required feature: {why}",
                p.info.name
            ));
        }
        let qf = p.queue_family.unwrap();
        let prio = [1.0f32];
        let qci = vk::DeviceQueueCreateInfo::default()
            .queue_family_index(qf)
            .queue_priorities(&prio);
        let dci = vk::DeviceCreateInfo::default().queue_create_infos(std::slice::from_ref(&qci));
        // SAFETY: valid physical device and create info.
        let dev = match unsafe { instance.create_device(p.pd, &dci, None) } {
            Ok(d) => d,
            Err(e) => return fail(format!("vulkan: cannot create device {index}: {e:?}")),
        };
        // SAFETY: queue family and index 0 were requested above.
        let queue = unsafe { dev.get_device_queue(qf, 0) };
        // SAFETY: valid physical device.
        let mem_props = unsafe { instance.get_physical_device_memory_properties(p.pd) };
        let hv = vk::MemoryPropertyFlags::HOST_VISIBLE
            | vk::MemoryPropertyFlags::HOST_COHERENT
            | vk::MemoryPropertyFlags::DEVICE_LOCAL;
        let first_local = (0..mem_props.memory_type_count).find(|&i| {
            mem_props.memory_types[i as usize]
                .property_flags
                .contains(vk::MemoryPropertyFlags::DEVICE_LOCAL)
        });
        let direct_map = std::env::var("DCDIT_VK_STAGING").map_or(true, |v| v != "1")
            && first_local.is_some_and(|i| {
                mem_props.memory_types[i as usize]
                    .property_flags
                    .contains(hv)
            });
        let info = p.info.clone();
        let subgroup = info.subgroup_arithmetic
            && std::env::var("DCDIT_VK_NO_SUBGROUP").map_or(true, |v| v != "1");
        let device = Arc::new(Device {
            _entry: entry,
            instance,
            dev,
            queue,
            queue_family: qf,
            mem_props,
            direct_map,
            info,
            free: Mutex::new(HashMap::new()),
        });
        let pci = vk::CommandPoolCreateInfo::default()
            .queue_family_index(device.queue_family)
            .flags(vk::CommandPoolCreateFlags::RESET_COMMAND_BUFFER);
        // SAFETY: valid device.
        let cmd_pool = unsafe { device.dev.create_command_pool(&pci, None) }
            .map_err(vkerr("create command pool"))?;
        let dummy = Arc::new(Buffer {
            raw: Some(device.alloc_raw(16, false)?),
            host: false,
            class: 16,
            dev: device.clone(),
        });
        Ok(Ctx {
            dev: device,
            state: Mutex::new(State {
                pipes: HashMap::new(),
                cmd_pool,
                cur: None,
                inflight: Vec::new(),
                spare: Vec::new(),
            }),
            subgroup,
            dummy,
            fault_no_barriers: std::env::var("DCDIT_VK_FAULT_NO_BARRIERS").is_ok_and(|v| v == "1"),
            commands: Default::default(),
            barriers: Default::default(),
        })
    }

    /// A buffer of at least `bytes` bytes from the pool (device memory, or
    /// host-visible staging memory with `host`).
    pub(crate) fn alloc(&self, bytes: usize, host: bool) -> Result<Arc<Buffer>> {
        let class = size_class(bytes as u64);
        let reuse = self
            .dev
            .free
            .lock()
            .ok()
            .and_then(|mut f| f.get_mut(&(class, host)).and_then(|v| v.pop()));
        let raw = match reuse {
            Some(r) => r,
            None => match self.dev.alloc_raw(class, host) {
                Ok(r) => r,
                Err(_) => {
                    // Out of memory: wait for in-flight work, drop the pool, retry.
                    self.sync()?;
                    self.trim();
                    self.dev.alloc_raw(class, host)?
                }
            },
        };
        debug_assert!(raw.size >= bytes as u64);
        Ok(Arc::new(Buffer {
            raw: Some(raw),
            host,
            class,
            dev: self.dev.clone(),
        }))
    }

    /// Frees every pooled buffer.
    pub(crate) fn trim(&self) {
        if let Ok(mut f) = self.dev.free.lock() {
            for (_, v) in f.drain() {
                for b in v {
                    // SAFETY: pooled buffers are unused by any batch.
                    unsafe {
                        self.dev.dev.destroy_buffer(b.buf, None);
                        self.dev.dev.free_memory(b.mem, None);
                    }
                }
            }
        }
    }

    fn pipe<'a>(&self, st: &'a mut State, name: &'static str, bindings: usize) -> Result<&'a Pipe> {
        if !st.pipes.contains_key(name) {
            let sg_name = format!("{name}_sg");
            let code = SHADERS
                .iter()
                .find(|(n, _, _)| self.subgroup && *n == sg_name)
                .or_else(|| SHADERS.iter().find(|(n, _, _)| *n == name))
                .ok_or_else(|| Error::backend(format!("vulkan: no shader `{name}`")))?;
            let (code, written) = (code.1, code.2);
            let words = ash::util::read_spv(&mut std::io::Cursor::new(code))
                .map_err(|e| Error::backend(format!("vulkan: bad SPIR-V for {name}: {e}")))?;
            let dev = &self.dev.dev;
            let binds: Vec<_> = (0..bindings as u32)
                .map(|i| {
                    vk::DescriptorSetLayoutBinding::default()
                        .binding(i)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .descriptor_count(1)
                        .stage_flags(vk::ShaderStageFlags::COMPUTE)
                })
                .collect();
            // SAFETY: valid device and create infos; objects are destroyed in Ctx::drop.
            unsafe {
                let dsl = dev
                    .create_descriptor_set_layout(
                        &vk::DescriptorSetLayoutCreateInfo::default().bindings(&binds),
                        None,
                    )
                    .map_err(vkerr("descriptor set layout"))?;
                let pcr = [vk::PushConstantRange {
                    stage_flags: vk::ShaderStageFlags::COMPUTE,
                    offset: 0,
                    size: PUSH_BYTES as u32,
                }];
                let layout = dev
                    .create_pipeline_layout(
                        &vk::PipelineLayoutCreateInfo::default()
                            .set_layouts(std::slice::from_ref(&dsl))
                            .push_constant_ranges(&pcr),
                        None,
                    )
                    .map_err(vkerr("pipeline layout"))?;
                let module = dev
                    .create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None)
                    .map_err(vkerr("shader module"))?;
                let stage = vk::PipelineShaderStageCreateInfo::default()
                    .stage(vk::ShaderStageFlags::COMPUTE)
                    .module(module)
                    .name(c"main");
                let ci = vk::ComputePipelineCreateInfo::default()
                    .stage(stage)
                    .layout(layout);
                let res = dev.create_compute_pipelines(vk::PipelineCache::null(), &[ci], None);
                dev.destroy_shader_module(module, None);
                let pipeline = res.map_err(|(_, e)| {
                    Error::backend(format!("vulkan: cannot build pipeline {name}: {e:?}"))
                })?[0];
                st.pipes.insert(
                    name,
                    Pipe {
                        pipeline,
                        layout,
                        dsl,
                        bindings,
                        written,
                    },
                );
            }
        }
        let p = &st.pipes[name];
        if p.bindings != bindings {
            return Err(Error::backend(format!(
                "vulkan: kernel {name} bound with {bindings} buffers, expects {}",
                p.bindings
            )));
        }
        Ok(p)
    }

    /// Releases finished batches (their buffers go back to the pool).
    fn reap(&self, st: &mut State, wait: bool) -> Result<()> {
        let dev = &self.dev.dev;
        let mut i = 0;
        while i < st.inflight.len() {
            let f = st.inflight[i].fence;
            // SAFETY: fence belongs to this device.
            let done = unsafe {
                if wait {
                    dev.wait_for_fences(&[f], true, u64::MAX)
                        .map_err(vkerr("wait for fence"))?;
                    true
                } else {
                    dev.get_fence_status(f).map_err(vkerr("fence status"))?
                }
            };
            if done {
                let mut b = st.inflight.swap_remove(i);
                b.keep.clear();
                b.dispatches = 0;
                b.submitted = false;
                b.hazards.clear();
                // SAFETY: the batch finished; its pool and fence may be reset.
                unsafe {
                    dev.reset_fences(&[b.fence]).map_err(vkerr("reset fence"))?;
                    dev.reset_descriptor_pool(b.dpool, vk::DescriptorPoolResetFlags::empty())
                        .map_err(vkerr("reset descriptor pool"))?;
                }
                st.spare.push(b);
            } else {
                i += 1;
            }
        }
        Ok(())
    }

    fn begin<'a>(&self, st: &'a mut State) -> Result<&'a mut Batch> {
        if st.cur.is_none() {
            self.reap(st, false)?;
            let dev = &self.dev.dev;
            let b = match st.spare.pop() {
                Some(b) => b,
                None => {
                    // SAFETY: valid device and create infos.
                    unsafe {
                        let cmd = dev
                            .allocate_command_buffers(
                                &vk::CommandBufferAllocateInfo::default()
                                    .command_pool(st.cmd_pool)
                                    .level(vk::CommandBufferLevel::PRIMARY)
                                    .command_buffer_count(1),
                            )
                            .map_err(vkerr("allocate command buffer"))?[0];
                        let sizes = [vk::DescriptorPoolSize {
                            ty: vk::DescriptorType::STORAGE_BUFFER,
                            descriptor_count: SETS_PER_BATCH * MAX_BINDINGS,
                        }];
                        let dpool = dev
                            .create_descriptor_pool(
                                &vk::DescriptorPoolCreateInfo::default()
                                    .max_sets(SETS_PER_BATCH)
                                    .pool_sizes(&sizes),
                                None,
                            )
                            .map_err(vkerr("descriptor pool"))?;
                        let fence = dev
                            .create_fence(&vk::FenceCreateInfo::default(), None)
                            .map_err(vkerr("fence"))?;
                        Batch {
                            cmd,
                            dpool,
                            fence,
                            keep: Vec::new(),
                            dispatches: 0,
                            submitted: false,
                            hazards: Hazards::default(),
                        }
                    }
                }
            };
            // SAFETY: the command buffer is not in use (fresh or reaped).
            unsafe {
                dev.begin_command_buffer(
                    b.cmd,
                    &vk::CommandBufferBeginInfo::default()
                        .flags(vk::CommandBufferUsageFlags::ONE_TIME_SUBMIT),
                )
                .map_err(vkerr("begin command buffer"))?;
            }
            st.cur = Some(b);
        }
        Ok(st.cur.as_mut().unwrap())
    }

    /// `(commands, barriers)` recorded so far.
    pub(crate) fn command_stats(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.commands.load(Relaxed), self.barriers.load(Relaxed))
    }

    /// Counts a command; records a barrier before it when `hazard` (unless
    /// the test-only fault is on).
    fn guard(&self, cmd: vk::CommandBuffer, hazard: bool) {
        use std::sync::atomic::Ordering::Relaxed;
        self.commands.fetch_add(1, Relaxed);
        if hazard && !self.fault_no_barriers {
            self.barriers.fetch_add(1, Relaxed);
            self.barrier(cmd);
        }
    }

    fn barrier(&self, cmd: vk::CommandBuffer) {
        let mb = vk::MemoryBarrier::default()
            .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
            .dst_access_mask(
                vk::AccessFlags::SHADER_READ
                    | vk::AccessFlags::SHADER_WRITE
                    | vk::AccessFlags::TRANSFER_READ
                    | vk::AccessFlags::TRANSFER_WRITE,
            );
        let stages = vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER;
        // SAFETY: recording into a command buffer in the recording state.
        unsafe {
            self.dev.dev.cmd_pipeline_barrier(
                cmd,
                stages,
                stages,
                vk::DependencyFlags::empty(),
                &[mb],
                &[],
                &[],
            )
        };
    }

    /// Submits the current batch (without waiting).
    fn submit(&self, st: &mut State) -> Result<()> {
        if let Some(mut b) = st.cur.take() {
            let dev = &self.dev.dev;
            // Everything recorded so far, before the host's reads and before
            // the next batches' commands (a barrier's second scope reaches
            // later submissions on the queue; batches track hazards only
            // within themselves).
            let mb = vk::MemoryBarrier::default()
                .src_access_mask(vk::AccessFlags::SHADER_WRITE | vk::AccessFlags::TRANSFER_WRITE)
                .dst_access_mask(
                    vk::AccessFlags::HOST_READ
                        | vk::AccessFlags::SHADER_READ
                        | vk::AccessFlags::SHADER_WRITE
                        | vk::AccessFlags::TRANSFER_READ
                        | vk::AccessFlags::TRANSFER_WRITE,
                );
            // SAFETY: the command buffer is recording; queue and fence are valid.
            unsafe {
                dev.cmd_pipeline_barrier(
                    b.cmd,
                    vk::PipelineStageFlags::COMPUTE_SHADER | vk::PipelineStageFlags::TRANSFER,
                    vk::PipelineStageFlags::HOST
                        | vk::PipelineStageFlags::COMPUTE_SHADER
                        | vk::PipelineStageFlags::TRANSFER,
                    vk::DependencyFlags::empty(),
                    &[mb],
                    &[],
                    &[],
                );
                dev.end_command_buffer(b.cmd)
                    .map_err(vkerr("end command buffer"))?;
                let cmds = [b.cmd];
                let si = vk::SubmitInfo::default().command_buffers(&cmds);
                dev.queue_submit(self.dev.queue, &[si], b.fence)
                    .map_err(vkerr("queue submit (device lost?)"))?;
            }
            b.submitted = true;
            st.inflight.push(b);
        }
        Ok(())
    }

    /// Submits pending work and waits for all of it.
    pub(crate) fn sync(&self) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        self.submit(&mut st)?;
        self.reap(&mut st, true)
    }

    /// Records a dispatch of kernel `name` over `bufs` (bindings 0..) with
    /// push constants `push` (u32 words; floats as bits) and `groups` workgroups.
    pub(crate) fn dispatch(
        &self,
        name: &'static str,
        bufs: &[&Arc<Buffer>],
        push: &[u32],
        groups: [u32; 3],
    ) -> Result<()> {
        if groups.contains(&0) {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap();
        let (pipeline, layout, dsl, written) = {
            let p = self.pipe(&mut st, name, bufs.len())?;
            (p.pipeline, p.layout, p.dsl, p.written)
        };
        let dev = &self.dev.dev;
        let batch = self.begin(&mut st)?;
        let (mut reads, mut writes) = (Vec::new(), Vec::new());
        for (i, b) in bufs.iter().enumerate() {
            let id = vk::Handle::as_raw(b.handle());
            if written & (1 << i) != 0 {
                writes.push(id);
            } else {
                reads.push(id);
            }
        }
        let hazard = batch.hazards.access(&reads, &writes);
        self.guard(batch.cmd, hazard);
        // SAFETY: pool, layout and buffers are valid; the set is used only in this batch.
        unsafe {
            let set = dev
                .allocate_descriptor_sets(
                    &vk::DescriptorSetAllocateInfo::default()
                        .descriptor_pool(batch.dpool)
                        .set_layouts(std::slice::from_ref(&dsl)),
                )
                .map_err(vkerr("allocate descriptor set"))?[0];
            let infos: Vec<[vk::DescriptorBufferInfo; 1]> = bufs
                .iter()
                .map(|b| {
                    [vk::DescriptorBufferInfo {
                        buffer: b.handle(),
                        offset: 0,
                        range: vk::WHOLE_SIZE,
                    }]
                })
                .collect();
            let writes: Vec<_> = infos
                .iter()
                .enumerate()
                .map(|(i, info)| {
                    vk::WriteDescriptorSet::default()
                        .dst_set(set)
                        .dst_binding(i as u32)
                        .descriptor_type(vk::DescriptorType::STORAGE_BUFFER)
                        .buffer_info(info)
                })
                .collect();
            dev.update_descriptor_sets(&writes, &[]);
            let mut pc = [0u32; PUSH_BYTES / 4];
            pc[..push.len()].copy_from_slice(push);
            dev.cmd_bind_pipeline(batch.cmd, vk::PipelineBindPoint::COMPUTE, pipeline);
            dev.cmd_bind_descriptor_sets(
                batch.cmd,
                vk::PipelineBindPoint::COMPUTE,
                layout,
                0,
                &[set],
                &[],
            );
            dev.cmd_push_constants(
                batch.cmd,
                layout,
                vk::ShaderStageFlags::COMPUTE,
                0,
                bytemuck::cast_slice(&pc),
            );
            dev.cmd_dispatch(batch.cmd, groups[0], groups[1], groups[2]);
        }
        batch.keep.extend(bufs.iter().map(|b| (*b).clone()));
        batch.dispatches += 1;
        let full = batch.dispatches >= BATCH_DISPATCHES;
        if full {
            self.submit(&mut st)?;
        }
        Ok(())
    }

    /// Records a buffer-to-buffer copy of `bytes` bytes.
    pub(crate) fn copy(&self, src: &Arc<Buffer>, dst: &Arc<Buffer>, bytes: usize) -> Result<()> {
        if bytes == 0 {
            return Ok(());
        }
        let mut st = self.state.lock().unwrap();
        let batch = self.begin(&mut st)?;
        let (r, w) = (
            vk::Handle::as_raw(src.handle()),
            vk::Handle::as_raw(dst.handle()),
        );
        let hazard = batch.hazards.access(&[r], &[w]);
        self.guard(batch.cmd, hazard);
        let region = vk::BufferCopy {
            src_offset: 0,
            dst_offset: 0,
            size: bytes as u64,
        };
        // SAFETY: both buffers hold at least `bytes` bytes.
        unsafe {
            self.dev
                .dev
                .cmd_copy_buffer(batch.cmd, src.handle(), dst.handle(), &[region])
        };
        batch.keep.push(src.clone());
        batch.keep.push(dst.clone());
        Ok(())
    }

    /// Uploads bytes into a new device buffer (directly when the device
    /// memory is mapped, else through a staging buffer and a recorded copy).
    pub(crate) fn upload(&self, data: &[u8]) -> Result<Arc<Buffer>> {
        let buf = self.alloc(data.len(), false)?;
        let p = buf.mapped();
        if !p.is_null() {
            // SAFETY: the buffer is fresh from the pool (no batch uses it) and
            // holds at least data.len() mapped, coherent bytes.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        } else if !data.is_empty() {
            let stage = self.alloc(data.len(), true)?;
            // SAFETY: as above, staging memory is always mapped.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), stage.mapped(), data.len()) };
            self.copy(&stage, &buf, data.len())?;
        }
        Ok(buf)
    }

    /// Reads `bytes` bytes of a buffer back (submits and waits).
    pub(crate) fn read(&self, buf: &Arc<Buffer>, bytes: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; bytes];
        if bytes == 0 {
            return Ok(out);
        }
        let p = buf.mapped();
        if !p.is_null() {
            self.sync()?;
            // SAFETY: all work is complete; the mapping is coherent.
            unsafe { std::ptr::copy_nonoverlapping(p, out.as_mut_ptr(), bytes) };
        } else {
            let stage = self.alloc(bytes, true)?;
            self.copy(buf, &stage, bytes)?;
            self.sync()?;
            // SAFETY: as above.
            unsafe { std::ptr::copy_nonoverlapping(stage.mapped(), out.as_mut_ptr(), bytes) };
        }
        Ok(out)
    }

    /// Name of the device.
    pub(crate) fn device_name(&self) -> String {
        let i = &self.dev.info;
        // The memory and kernel paths in use, so a log (and the tests that
        // force the other paths through DCDIT_VK_STAGING / DCDIT_VK_NO_SUBGROUP)
        // can tell which ran.
        let mem = if self.dev.direct_map {
            "mapped device memory"
        } else {
            "staging copies"
        };
        let sg = if self.subgroup {
            "subgroup kernels"
        } else {
            "no subgroup kernels"
        };
        format!("vulkan:{} ({}, {}; {mem}, {sg})", i.index, i.name, i.kind)
    }
}

#[cfg(test)]
mod tests {
    use super::Hazards;
    use quickcheck::{QuickCheck, TestResult};

    /// One recorded command: the buffers it reads and writes.
    type Access = (Vec<u64>, Vec<u64>);

    fn conflicts(earlier: &Access, later: &Access) -> bool {
        let (r0, w0) = earlier;
        let (r1, w1) = later;
        r1.iter().chain(w1).any(|b| w0.contains(b)) || w1.iter().any(|b| r0.contains(b))
    }

    /// Random command sequences over four buffers, checked against the
    /// definition pairwise: every two conflicting commands have a barrier
    /// between them (safety), and every barrier sits before a command that
    /// conflicts with one recorded since the previous barrier (no barrier
    /// without a hazard).
    #[test]
    fn barriers_exactly_where_commands_conflict() {
        fn prop(raw: Vec<(u8, u8)>) -> TestResult {
            let cmds: Vec<Access> = raw
                .iter()
                .map(|&(r, w)| {
                    let set = |m: u8| (0..4u64).filter(|b| m & (1 << b) != 0).collect();
                    (set(r), set(w))
                })
                .collect();
            let mut h = Hazards::default();
            let barrier: Vec<bool> = cmds.iter().map(|(r, w)| h.access(r, w)).collect();
            for j in 0..cmds.len() {
                let last = (0..=j).rev().find(|&k| barrier[k] && k < j);
                for i in 0..j {
                    let separated = barrier[i + 1..=j].iter().any(|&b| b);
                    if conflicts(&cmds[i], &cmds[j]) && !separated {
                        return TestResult::error(format!("{i} and {j} conflict, no barrier"));
                    }
                }
                if barrier[j] {
                    let from = last.unwrap_or(0);
                    if !(from..j).any(|i| conflicts(&cmds[i], &cmds[j])) {
                        return TestResult::error(format!("needless barrier before {j}"));
                    }
                }
            }
            TestResult::passed()
        }
        QuickCheck::new()
            .tests(500)
            .quickcheck(prop as fn(Vec<(u8, u8)>) -> TestResult);
    }

    #[test]
    fn independent_reads_share_a_barrier_interval() {
        let mut h = Hazards::default();
        assert!(!h.access(&[1], &[2])); // y = f(x)
        assert!(!h.access(&[1], &[3])); // z = g(x): independent of y
        assert!(h.access(&[2, 3], &[4])); // reads y and z: barrier
        assert!(!h.access(&[5], &[6]));
        assert!(h.access(&[7], &[5])); // overwrites what was read: barrier
    }
}
